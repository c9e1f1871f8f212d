"""Two "nodes" on one machine: two separate ``torchrun --nnodes 2`` agents (one process each, CPU, gloo) that meet
through a c10d rendezvous on localhost, as on a real cluster (the same command on every node, the first node's host
as the endpoint). Each node runs in its own working directory, so anything the second node wrote would be visible:
only global rank 0 may write the run directory, the checkpoints and the MLflow store."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import uuid


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_nodes_over_c10d_rendezvous(tmp_path, fw):
    start = time.perf_counter()
    endpoint, run_id = f"localhost:{_free_port()}", f"multinode-{uuid.uuid4().hex[:8]}"
    args = [*fw.synthetic_args("two_nodes"), "epochs=1", "batch_size=16", "log_every=1",
            "regularizer.ema.enabled=true",  # the replica digests cover the EMA copy too
            "distributed.bucket_cap_mb=1", "distributed.static_graph=true"]  # non-default knobs reach DDP
    nodes = []
    for node_rank in (0, 1):
        cwd = tmp_path / f"node{node_rank}"
        cwd.mkdir()
        # is_host: on one machine both agents match "localhost"; say which one hosts the rendezvous store (on a
        # cluster torchrun infers it from the endpoint's host name)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
                    "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                    "--rdzv-id", run_id, "--rdzv-conf", f"is_host={str(node_rank == 0).lower()},join_timeout=60",
                    "--max-restarts", "0"]
        log_path = cwd / "torchrun.log"
        with open(log_path, "w") as out:
            nodes.append((subprocess.Popen([*launcher, str(fw.REPO / "train.py"), *args], cwd=cwd,
                                           env=fw.script_env(), stdout=out, stderr=subprocess.STDOUT, text=True),
                          log_path, cwd))
    try:
        for proc, log_path, _ in nodes:
            proc.wait(timeout=180)
    finally:
        for proc, _, _ in nodes:
            if proc.poll() is None:
                proc.kill()
    outputs = [log_path.read_text() for _, log_path, _ in nodes]
    for (proc, _, _), output in zip(nodes, outputs):
        assert proc.returncode == 0, output[-6000:]

    (node0, node1) = (cwd for _, _, cwd in nodes)
    # node 1 (global rank 1) wrote nothing: no MLflow store, no checkpoint, no log, no config (Hydra itself creates
    # the empty run directory on every process)
    assert sorted(p.relative_to(node1).as_posix() for p in node1.rglob("*") if p.is_file()) == ["torchrun.log"]
    assert sorted(p.name for p in node0.iterdir()) == ["mlflow.db", "mlruns", "outputs", "torchrun.log"]
    run_dir = node0 / "outputs" / "two_nodes"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pth", "epoch_0001.pth"]
    log_text = (run_dir / "train.log").read_text()
    assert "world_size=2" in log_text and "static_graph=True" in log_text and "bucket_cap_mb=1.0" in log_text

    final = json.loads((run_dir / "final_metrics.json").read_text())
    digests = final["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1], "the two nodes' model/EMA replicas differ"
    assert final["global_step"] == 96 // (16 * 2)  # 96 synthetic images split over the 2 ranks

    _, runs = fw.mlflow_runs(node0)
    assert len(runs) == 1 and runs[0].data.tags["world_size"] == "2"
    assert runs[0].data.params["derived.global_batch"] == "32"
    elapsed = time.perf_counter() - start
    print(f"two-node torchrun test: {elapsed:.1f}s")
