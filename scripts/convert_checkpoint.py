#!/usr/bin/env python
"""Convert any supported checkpoint (official Vim / ShuffleMamba / Mamba-Reg `.pth`, timm-style, ours, bare
state_dict) into a clean weights-only file that loads without unpickling code.

    python scripts/convert_checkpoint.py vim_t_midclstok_76p1acc.pth --model vim_tiny --trust-pickle \
        --out vim_tiny.safetensors            # or --use-ema, or --out file.pth (plain state_dict)

The weights are first loaded strictly into `--model`, so a file that does not fit fails here with the list
of missing / unexpected / mismatched keys. The model name is stored with the weights (safetensors metadata,
or the "model_name" entry of a .pth dict).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from visionmamba.models import UnknownModelError, create_model  # noqa: E402
from visionmamba.models._pretrained import CheckpointError, load_pretrained  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--model", required=True, help="registered model name, e.g. vim_tiny")
    parser.add_argument("--out", required=True, help="output .safetensors or .pth")
    parser.add_argument("--use-ema", action="store_true", help="take the EMA weights instead of the raw ones")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling (needed for official files with pickled args; only for trusted files)")
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    args = parser.parse_args(argv)
    if os.path.exists(args.out):
        print(f"error: {args.out} exists; refusing to overwrite", file=sys.stderr)
        return 2
    try:
        model = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size)
        report = load_pretrained(model, args.checkpoint, use_ema=args.use_ema, trust_pickle=args.trust_pickle,
                                 drop_mismatched_head=False)
    except (CheckpointError, UnknownModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    tmp = args.out + ".tmp"
    if args.out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state_dict, tmp, metadata={"model_name": args.model, "source": os.path.basename(args.checkpoint)})
    else:
        torch.save({"model": state_dict, "model_name": args.model}, tmp)
    os.replace(tmp, args.out)
    print(f"{report.summary()}\nwrote {args.out} ({len(state_dict)} tensors, model {args.model})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
