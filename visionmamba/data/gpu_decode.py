"""GPU JPEG decoding (``data.decode=gpu``): workers read file bytes, the GPU decodes and augments whole batches.

The CPU path (``data.decode=cpu``) decodes every image with PIL and augments it in a DataLoader worker; on a
16-core machine that caps training at a few thousand images/s per GPU. Here the work is split instead:

* DataLoader workers (:class:`EncodedImageFolder` + :func:`collate_encoded`) only read each file's bytes (and parse
  its JPEG header) into one flat ``uint8`` buffer per batch, which the loader pins.
* :class:`GpuDecodeLoader` decodes the batch with one ``torchvision.io.decode_jpeg(list, device=cuda)`` call
  (nvJPEG; the hardware JPEG engines on A100/H100/H200 for baseline JPEGs) and applies the train or eval transform
  of :mod:`visionmamba.data.gpu_augment` on the GPU. Two background threads with their own CUDA streams pipeline
  this (decode batch k+1 while augmenting batch k) and keep ``prefetch`` finished batches ready ahead of training.
  It yields ``(float32 images (B, 3, S, S), int64 labels (B,))`` already on the device, so
  ``engine.train_one_epoch`` / ``evaluate`` and Mixup/CutMix work on them unchanged.

Files nvJPEG should not get are decoded by PIL in the worker, as the CPU path does: anything that is not an
8-bit baseline/progressive Huffman JPEG with 1 or 3 components ending in an EOI marker (PNGs named ``.JPEG``,
CMYK JPEGs, truncated files...). A JPEG that the batched decode still rejects is decoded alone, and if that fails
too, by PIL in the main process; a file PIL cannot decode either is unreadable: it is flagged, warned about once,
counted (``data/unreadable_images``) and replaced by the next readable sample, or raises
:class:`~visionmamba.data.CorruptImageError` with ``strict`` -- the same rules as :class:`SafeImageFolder`.

Randomness: every batch's augmentation parameters come from a CPU ``torch.Generator`` seeded with (a seed drawn
from the DataLoader's generator when the pass starts, the batch's index in the epoch). The DataLoader's generator
is seeded per rank and saved in checkpoints, so augmentations are reproducible, differ per rank and epoch, do not
depend on ``workers``, and a mid-epoch resume reproduces the skipped-to batches exactly (workers > 0 included).
On a CPU device the same code decodes with libjpeg-turbo (bit-identical to PIL) and augments on CPU tensors.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .datasets import SafeImageFolder
from .gpu_augment import DeviceEvalTransform, DeviceTrainTransform
from .loader import ResumableDataLoader, build_loader

__all__ = [
    "DECODE_MODES",
    "EncodedImageFolder",
    "GpuDecodeLoader",
    "build_gpu_decode_loader",
    "collate_encoded",
    "decode_batch",
    "default_decode_device",
    "device_decodable",
    "jpeg_header",
]

_logger = logging.getLogger(__name__)

DECODE_MODES = ("cpu", "gpu")
KIND_JPEG, KIND_RAW = 0, 1  # payload kinds: encoded JPEG bytes | decoded HWC uint8 pixels (PIL in the worker)
_META_COLUMNS = 6  # offset, nbytes, kind, height, width, sample index

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (a warning on every call); they still work
# and are what torchvision 0.2x on the GPU machines ships.
warnings.filterwarnings("ignore", message=r"The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

# JPEG start-of-frame markers nvJPEG decodes: baseline, extended sequential and progressive Huffman coding.
_SOF_DEVICE = (0xC0, 0xC1, 0xC2)
_SOF_ALL = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0..SOF15 minus DHT, JPG and DAC
_TRAILING_PADDING = b"\x00\r\n \t"


def jpeg_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int, int, int] | None:
    """``(sof_marker, precision, height, width, components)`` from a JPEG's first start-of-frame segment.

    Walks the marker segments from SOI; returns None for data that is not a JPEG or reaches the scan (or its end)
    without a frame header.
    """
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI / SOS before any frame header
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if marker in _SOF_ALL:
            if pos + 10 > size:
                return None
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return marker, data[pos + 4], height, width, data[pos + 9]
        pos += 2 + length
    return None


def device_decodable(data: bytes | bytearray) -> tuple[int, int] | None:
    """``(height, width)`` when the file can go to the batched decoder, else None (decode it with PIL).

    The batched nvJPEG call fails as a whole on one bad image, so only files that look complete and supported go to
    it: 8-bit Huffman baseline/extended/progressive frames with 1 (gray) or 3 (YCbCr) components, ending with the
    EOI marker (a missing EOI is the usual truncated download; PIL rejects those, and so must this path).
    """
    header = jpeg_header(data)
    if header is None:
        return None
    marker, precision, height, width, components = header
    if marker not in _SOF_DEVICE or precision != 8 or components not in (1, 3) or height == 0 or width == 0:
        return None
    end = len(data)
    while end > 2 and data[end - 1] in _TRAILING_PADDING:  # zero / newline padding after EOI is harmless
        end -= 1
    if data[end - 2] != 0xFF or data[end - 1] != 0xD9:
        return None
    return height, width


def _read_bytes(path: str) -> bytearray:
    """The whole file in a writable buffer (``torch.frombuffer`` without a copy or a read-only warning)."""
    with open(path, "rb") as fh:
        buffer = bytearray(os.fstat(fh.fileno()).st_size)
        view = memoryview(buffer)
        filled = 0
        while filled < len(buffer):
            count = fh.readinto(view[filled:])
            if not count:
                break
            filled += count
    return buffer[:filled] if filled < len(buffer) else buffer


def _pil_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as uint8 (H, W, 3) (the layout PIL hands out; no transpose in the worker)."""
    return torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8))


def _pil_read(path: str) -> torch.Tensor:
    with open(path, "rb") as fh:
        image = Image.open(fh)
        return _pil_pixels(image)


class EncodedImageFolder(SafeImageFolder):
    """A :class:`SafeImageFolder` whose samples are the encoded files, for :class:`GpuDecodeLoader`.

    ``dataset[i]`` is ``(payload, kind, height, width, target, index)``: ``payload`` is the file's bytes as a 1-D
    uint8 tensor when :func:`device_decodable` accepts it (``kind == KIND_JPEG``), else the PIL-decoded RGB
    pixels ``(H, W, 3)`` flattened (``KIND_RAW``); ``index`` is the sample actually returned (an unreadable one is
    replaced by the next readable sample, as in :class:`SafeImageFolder`, whose flags and ``strict`` rules apply).

    Args:
        root: A split directory, ``<root>/<class>/<image>``.
        strict: Raise on the first unreadable image instead of skipping it.
    """

    def __init__(self, root: str | os.PathLike, *, strict: bool = False) -> None:
        super().__init__(root, transform=None, strict=strict)
        # Main-process memo: samples the batched decoder rejected but PIL reads (decoded by PIL from then on).
        self.host_decoded: set[int] = set()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, int, int, int]:
        i, (payload, kind, height, width), target = self.first_readable(index, self._read_payload)
        return payload, kind, height, width, target, i

    def _read_payload(self, path: str) -> tuple[torch.Tensor, int, int, int]:
        data = _read_bytes(path)
        size = device_decodable(data)
        if size is not None:
            return torch.frombuffer(data, dtype=torch.uint8), KIND_JPEG, size[0], size[1]
        pixels = _pil_pixels(self.loader(path))  # PIL, exactly as the CPU path (raises for unreadable files)
        return pixels.reshape(-1), KIND_RAW, pixels.shape[0], pixels.shape[1]

    def load_decoded(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(uint8 (3, H, W), target, i)``: sample ``index`` (or the next readable one) decoded by PIL."""
        i, pixels, target = self.first_readable(index, _pil_read)
        return pixels.permute(2, 0, 1), target, i


def collate_encoded(samples: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(buffer, meta, targets)``: all payloads back to back in one uint8 buffer (one shared-memory block and one
    pinned copy per batch instead of one per image), ``meta`` (B, 6) int64 rows ``(offset, nbytes, kind, height,
    width, index)`` and ``targets`` (B,) int64."""
    sizes = [sample[0].numel() for sample in samples]
    total = sum(sizes)
    out = None
    if torch.utils.data.get_worker_info() is not None:
        # in a worker: build the batch straight in shared memory, as PyTorch's default collate does
        out = torch.tensor([], dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    buffer = torch.cat([sample[0] for sample in samples], out=out) if samples else torch.empty(0, dtype=torch.uint8)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    meta = torch.tensor([[offset, size, kind, height, width, index]
                         for offset, size, (_, kind, height, width, _, index) in zip(offsets, sizes, samples)],
                        dtype=torch.int64).view(-1, _META_COLUMNS)
    targets = torch.tensor([sample[4] for sample in samples], dtype=torch.int64)
    return buffer, meta, targets


def default_decode_device() -> torch.device:
    """This process's current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type == "cuda":  # one batched nvJPEG call
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)
    return [decode_jpeg(payload, mode=ImageReadMode.RGB) for payload in payloads]


def decode_batch(batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], dataset: EncodedImageFolder,
                 device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Decodes a :func:`collate_encoded` batch on ``device``.

    Returns:
        ``(images, targets)``: uint8 ``(3, H_i, W_i)`` tensors on ``device`` and the (CPU) int64 labels, in which
        an image that turned out unreadable has been replaced by the next readable sample and its label.
    """
    buffer, meta, targets = batch
    rows = meta.tolist()
    payloads = [buffer[offset:offset + size] for offset, size, *_ in rows]
    images: list[torch.Tensor | None] = [None] * len(rows)
    by_device, host = [], []  # slots for the batched decoder / for PIL in this process
    for slot, (_, _, kind, height, width, index) in enumerate(rows):
        if kind == KIND_RAW:  # decoded by PIL in the worker: (H, W, 3) -> (3, H, W) view, then to the device
            images[slot] = payloads[slot].view(height, width, 3).permute(2, 0, 1).to(device, non_blocking=True)
        elif index in dataset.host_decoded:
            host.append(slot)
        else:
            by_device.append(slot)
    if by_device:
        try:
            decoded = _decode_jpegs([payloads[slot] for slot in by_device], device)
        except RuntimeError:
            # The batched call fails as a whole: decode one by one, and PIL whatever still fails.
            decoded = []
            for slot in by_device:
                try:
                    decoded.append(_decode_jpegs([payloads[slot]], device)[0])
                except RuntimeError as exc:
                    _logger.debug("batched decoder rejected %s (%s); decoding with PIL",
                                  dataset.samples[rows[slot][5]][0], exc)
                    dataset.host_decoded.add(rows[slot][5])
                    decoded.append(None)
                    host.append(slot)
        for slot, image in zip(by_device, decoded):
            images[slot] = image
    if host:
        targets = targets.clone()
        for slot in host:
            pixels, target, _ = dataset.load_decoded(rows[slot][5])  # PIL; flags + replaces unreadable files
            images[slot] = pixels.to(device)
            targets[slot] = target
    return images, targets  # type: ignore[return-value]


def _batch_seed(pass_seed: int, batch_index: int) -> int:
    """A 63-bit seed per (pass, batch): a golden-ratio stride keeps neighbouring batches' streams apart."""
    return (pass_seed + (batch_index + 1) * 0x9E3779B97F4A7C15) % (1 << 63)


_END = object()
# Passes whose background thread may still run: stopped at interpreter exit, before the DataLoader workers are
# (a daemon thread still inside torch code when the interpreter finalizes aborts the process).
_LIVE_PASSES: weakref.WeakSet = weakref.WeakSet()
_EXIT_HOOK_REGISTERED = False


def _close_live_passes() -> None:
    for iterator in list(_LIVE_PASSES):
        iterator.close()


def _track_pass(iterator: _DeviceBatchIterator) -> None:
    global _EXIT_HOOK_REGISTERED
    if not _EXIT_HOOK_REGISTERED:
        # registered after build_loader's worker-shutdown hook, so it runs before it (atexit is last-in first-out)
        atexit.register(_close_live_passes)
        _EXIT_HOOK_REGISTERED = True
    _LIVE_PASSES.add(iterator)


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Stage:
    """A background thread with its own CUDA stream: calls ``step`` until it returns ``_END`` / a ``_Failure`` (or
    ``stop`` is set) and queues its results on ``out``, each with an event recorded on the stream after it."""

    def __init__(self, name: str, device: torch.device, stop: threading.Event, maxsize: int,
                 step: Callable[[], Any]) -> None:
        self.device, self.stop, self.step = device, stop, step
        self.out: queue.Queue = queue.Queue(maxsize=maxsize)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread
                stream = torch.cuda.Stream(self.device)
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                while not self.stop.is_set():
                    item = self.step()  # _END and _Failure pass through
                    if isinstance(item, tuple) and stream is not None:
                        event = torch.cuda.Event()
                        event.record(stream)
                        item = (*item[:-1], event)
                    if not self.put(item) or not isinstance(item, tuple):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed downstream; the consumer re-raises it
            self.put(_Failure(exc))

    def put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Any:
        while True:
            try:
                return self.out.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    return _END

    def drain_and_join(self) -> None:
        while self.thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.out.get(timeout=0.05)
        self.thread.join()


def _wait_on_current_stream(event: torch.cuda.Event | None, tensors: Sequence[torch.Tensor]) -> None:
    """Makes the current stream wait for ``event`` (recorded on another stream that produced ``tensors``) and
    tells the caching allocator that the current stream uses them, so their memory is not handed out again
    before that work is done."""
    if event is None:
        return
    stream = torch.cuda.current_stream(tensors[0].device)
    stream.wait_event(event)
    for tensor in tensors:
        tensor.record_stream(stream)


class _DeviceBatchIterator:
    """One pass of a :class:`GpuDecodeLoader`.

    ``prefetch == 0``: each batch is decoded and augmented in the caller's thread, on its stream. Otherwise two
    background threads, each on its own CUDA stream, form a pipeline: one reads the workers' byte batches and
    decodes them (a blocking nvJPEG call that releases the GIL), the other augments the previous decoded batch
    meanwhile; up to ``prefetch`` finished batches wait for the training loop.
    """

    def __init__(self, owner: GpuDecodeLoader, inner, start_batch: int, pass_seed: int) -> None:
        self.owner = owner
        self.inner = inner
        self.batch_index = start_batch
        self.pass_seed = pass_seed
        self.stages: list[_Stage] = []
        if owner.prefetch > 0:
            self.stop = threading.Event()
            decode = _Stage("gpu-decode", owner.device, self.stop, 1, self._decode_next)
            augment = _Stage("gpu-augment", owner.device, self.stop, owner.prefetch,
                             lambda: self._augment_from(decode))
            self.stages = [decode, augment]
            _track_pass(self)
            for stage in self.stages:
                stage.thread.start()

    @property
    def thread(self) -> threading.Thread | None:
        """The last stage's thread (None without prefetching or once the pass is closed)."""
        return self.stages[-1].thread if self.stages else None

    def __iter__(self) -> _DeviceBatchIterator:
        return self

    def _decode_next(self) -> Any:
        try:
            batch = next(self.inner)
        except StopIteration:
            return _END
        images, targets = self.owner.decode(batch)
        return images, targets, None

    def _augment_from(self, decode: _Stage) -> Any:
        item = decode.get()
        if not isinstance(item, tuple):  # _END or _Failure
            return item
        images, targets, event = item
        _wait_on_current_stream(event, [*images, targets])
        out = self.owner.augment(images, self.batch_index, self.pass_seed)
        self.batch_index += 1
        return out, targets, None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.stages:
            batch = next(self.inner)
            images, targets = self.owner.decode(batch)
            out = self.owner.augment(images, self.batch_index, self.pass_seed)
            self.batch_index += 1
            return out, targets
        item = self.stages[-1].get()
        if not isinstance(item, tuple):
            self.close()
            if isinstance(item, _Failure):
                raise item.exc
            raise StopIteration
        images, targets, event = item
        _wait_on_current_stream(event, [images, targets])
        return images, targets

    def close(self) -> None:
        """Stops the background threads (e.g. of an abandoned pass), dropping what they prepared."""
        stages, self.stages = self.stages, []
        if not stages:
            return
        self.stop.set()
        for stage in reversed(stages):
            stage.drain_and_join()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class GpuDecodeLoader:
    """Iterates ``(float32 images (B, 3, S, S), int64 labels (B,))`` on ``device`` from an encoded-bytes loader.

    Behaves like the :class:`~visionmamba.data.ResumableDataLoader` it wraps: ``len()``, ``.sampler``,
    ``.batch_sampler``, ``.generator``, ``.dataset``, :meth:`skip_next_batches`; ``set_sampler_epoch`` and
    ``get_loader_rng_state`` / ``set_loader_rng_state`` work on it unchanged.

    Args:
        loader: A loader over an :class:`EncodedImageFolder` with :func:`collate_encoded`.
        transform: A :class:`DeviceTrainTransform` or :class:`DeviceEvalTransform`.
        device: Where images are decoded and augmented (and yielded).
        prefetch: Finished batches kept ready by the background decode -> augment pipeline (threads with their own
            CUDA streams); 0 = decode and augment in the caller's thread.
    """

    def __init__(self, loader: ResumableDataLoader, transform: DeviceTrainTransform | DeviceEvalTransform, *,
                 device: torch.device | str, prefetch: int = 2) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.loader = loader
        self.transform = transform
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = prefetch
        self._skip = 0
        self._active: weakref.ref | None = None

    # the wrapped loader's API
    @property
    def dataset(self) -> EncodedImageFolder:
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_sampler(self):
        return self.loader.batch_sampler

    @property
    def generator(self) -> torch.Generator | None:
        return self.loader.generator

    @property
    def batch_size(self) -> int | None:
        return self.loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def skip_next_batches(self, num_batches: int) -> None:
        """The next pass starts after its first ``num_batches`` batches, which are not even read; the batches it
        yields are augmented exactly as in a full pass (per-batch seeds)."""
        self.loader.skip_next_batches(num_batches)
        self._skip = num_batches

    def __iter__(self) -> _DeviceBatchIterator:
        self.close()  # a persistent-worker iterator must not be shared with an abandoned pass's thread
        # The pass seed comes from the DataLoader's generator (per rank, in checkpoints), before the DataLoader
        # draws its own base seed from it; restoring that generator replays the pass exactly.
        pass_seed = int(torch.randint(0, 1 << 62, (), generator=self.loader.generator)) \
            if self.loader.generator is not None else 0
        start, self._skip = self._skip, 0
        iterator = _DeviceBatchIterator(self, iter(self.loader), start, pass_seed)
        self._active = weakref.ref(iterator)
        return iterator

    def close(self) -> None:
        """Stops the current pass's background thread, if any."""
        iterator = self._active() if self._active is not None else None
        if iterator is not None:
            iterator.close()
        self._active = None

    def decode(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """A :func:`collate_encoded` batch -> (uint8 images on the device, int64 labels on the device)."""
        images, targets = decode_batch(batch, self.dataset, self.device)
        return images, targets.to(self.device, non_blocking=True)

    def augment(self, images: list[torch.Tensor], batch_index: int = 0, pass_seed: int = 0) -> torch.Tensor:
        """The transform of batch ``batch_index`` of the pass with seed ``pass_seed``, on the current stream."""
        if not isinstance(self.transform, DeviceTrainTransform):
            return self.transform(images)
        seed = _batch_seed(pass_seed, batch_index)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.Generator(device=self.device).manual_seed(seed ^ 0x5DEECE66D)
        return self.transform(images, generator, noise)

    def process(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], batch_index: int = 0,
                pass_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode + transform one :func:`collate_encoded` batch on the current stream."""
        images, targets = self.decode(batch)
        return self.augment(images, batch_index, pass_seed), targets


def build_gpu_decode_loader(
        dataset: EncodedImageFolder,
        transform: DeviceTrainTransform | DeviceEvalTransform,
        *,
        device: torch.device | str | None = None,
        prefetch: int = 2,
        **loader_kwargs: Any,
) -> GpuDecodeLoader:
    """:func:`~visionmamba.data.build_loader` (same keyword arguments: samplers, seeding, workers, pinning,
    persistent workers, prefetch factor) over the encoded bytes, wrapped in a :class:`GpuDecodeLoader`.

    ``device`` defaults to :func:`default_decode_device`; ``prefetch`` is the number of device batches prepared
    ahead (``data.gpu_prefetch``).
    """
    inner = build_loader(dataset, collate_fn=collate_encoded, **loader_kwargs)
    device = torch.device(device) if device is not None else default_decode_device()
    if device.type != "cuda":
        _logger.info("data.decode=gpu on %s: JPEGs are decoded and augmented in the main process", device)
    return GpuDecodeLoader(inner, transform, device=device, prefetch=prefetch)

