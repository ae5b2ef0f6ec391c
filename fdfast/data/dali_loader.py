"""The NVIDIA DALI path: file bytes in file order from Python, decode + crop + flip + normalise in DALI.

Why an external source instead of ``fn.readers.file``: the batch order then comes from the same
`EpochOrder` as the torch path (same shards, same reshuffle, exact resume position), and the bytes
pass through Python where a file that disappeared is caught.  Decoding is DALI's: ``mixed`` (nvJPEG on
the GPU) on CUDA devices, its CPU decoder otherwise; the crop is fused into the decode (only the
region of interest is decoded). Each sample's crop window and flip come from its own seed
(`base.sample_crop`, the torch path's rule, on the size read from the image header), so a resumed run
gets exactly the crops the interrupted run would have had.

Bad files: DALI has no option to skip a file its decoder rejects; any such file is a critical error
after which the pipeline object is dead. So files are checked once up front (`files.check_files`,
cached), and if a decode still fails (a file damaged in its middle), the batches in flight are checked
with a full PIL decode, the culprits are marked bad and replaced by the next readable file (the torch
path's rule), and the pipeline is rebuilt at the same position.

Shards (`DaliShardLoader`): the bytes come from DALI's own WebDataset reader (its C++ threads read the tars,
no Python per sample); the order is still `ShardOrder`'s because the reader reads the members its index files
list, in the listed order: for each epoch (or resume position) the loader writes index files that list this
rank's samples in order, one per run of samples from one shard. Crops come from each sample's seed and the image
size the shard index recorded (`base.sample_crop`), fed beside the reader through an external source.
"""
from __future__ import annotations

import collections
import io
import weakref

import numpy as np
import torch

from fdfast.data.base import FDLoader, sample_crop
from fdfast.data.files import EpochOrder, FileList, decodes
from fdfast.errors import FDFastError
from fdfast.signals import stop_signals_blocked

PREFETCH = 2  # batches DALI prepares ahead


class _BatchSource:
    """DALI external source: each call returns the next batch in EpochOrder: file bytes, crop anchors (x, y), crop
    shapes (w, h) in pixels and flips."""

    def __init__(self, loader: "DaliFDLoader"):
        # weak: the pipeline holds this source, the loader holds the pipeline; no cycle keeps DALI alive
        self.loader = weakref.proxy(loader)
        self.positions = loader.order.positions(loader.epoch, loader.batch)
        self.in_flight = collections.deque()  # file indices of batches produced, not yet handed out

    def __call__(self):
        ld = self.loader
        index, seeds = ld.order.batch(*next(self.positions))
        encoded, used = [], []
        for i in index:
            i, data, header = ld.read(int(i))
            encoded.append(data)
            used.append((i, header.size))
        self.in_flight.append([i for i, _ in used])
        return (encoded, *_crop_inputs([size for _, size in used], seeds, ld))


class DaliFDLoader(FDLoader):
    name = "dali"

    def __init__(self, files: FileList, order: EpochOrder, *, image_size: int, mean, std, scale, ratio,
                 hflip: float, num_workers: int, device: str = "cpu"):
        super().__init__(files, order)
        self.size, self.scale, self.ratio, self.hflip = image_size, scale, ratio, hflip
        self.mean255 = [float(m) * 255 for m in mean]  # DALI normalises the 0-255 pixels
        self.std255 = [float(s) * 255 for s in std]
        self.num_threads = max(1, int(num_workers))
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.bad_index: set[int] = set()  # files that failed to decode in this run
        self.pipe = None
        self.source = None

    # -- reading -----------------------------------------------------------------------------------
    def read(self, index: int):
        """(index actually read, its bytes, its header as a lazily opened PIL image): bad or vanished files
        are replaced by the next readable file."""
        from PIL import Image
        n = len(self.files.paths)
        for k in range(n):
            i = (index + k) % n
            if i in self.bad_index:
                continue
            try:
                data = np.fromfile(self.files.paths[i], dtype=np.uint8)
                return i, data, Image.open(io.BytesIO(data.tobytes()))  # reads the header only
            except (OSError, ValueError):  # vanished, empty (UnidentifiedImageError is an OSError)
                pass
            self._mark_bad(i)
        raise FDFastError(f"no image under {str(self.files.root)!r} can be read any more; check the data")

    def _mark_bad(self, i: int) -> None:
        self.bad_index.add(i)
        self._note_bad([self.files.paths[i]])
        if len(self.bad_index) >= len(self.files.paths):
            raise FDFastError(f"none of the {len(self.files.paths)} image files under "
                              f"{str(self.files.root)!r} can be decoded; replace the data")

    # -- the pipeline ------------------------------------------------------------------------------
    def _build_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        decoder_device = "mixed" if self.gpu else "cpu"

        @pipeline_def(batch_size=self.order.batch_size, num_threads=self.num_threads,
                      device_id=self._device_id(), prefetch_queue_depth=PREFETCH)
        def pipeline():  # no DALI randomness: crops and flips come with the batch (_BatchSource)
            encoded, anchor, shape, mirror = self._inputs()
            # RandomResizedCrop: decode only the window, then resize it to S x S
            images = fn.decoders.image_slice(encoded, anchor, shape, device=decoder_device,
                                             output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                                             normalized_shape=False, adjust_orientation=False)
            images = fn.resize(images, resize_x=self.size, resize_y=self.size, antialias=True,
                               interp_type=types.INTERP_LINEAR)
            return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                            crop=(self.size, self.size), mean=self.mean255, std=self.std255,
                                            mirror=mirror)  # float32 [B, 3, S, S]

        self.source = self._make_source()
        with stop_signals_blocked():  # DALI's threads keep SIGINT / SIGTERM blocked: the main thread gets them
            pipe = pipeline()
            pipe.build()
        return pipe

    def _make_source(self):
        return _BatchSource(self)

    def _inputs(self) -> list:
        """DALI nodes (encoded bytes, crop anchors, crop shapes, flips)."""
        from nvidia.dali import fn
        return fn.external_source(source=self.source, num_outputs=len(_SOURCE_TYPES), batch=True,
                                  dtype=_dali_types(_SOURCE_TYPES))

    def _device_id(self) -> int | None:
        if not self.gpu:
            return None  # a CPU-only pipeline: no CUDA context at all
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def _restart(self) -> None:
        self.close()
        self.pipe = self._build_pipeline()

    def _next_batch(self):
        for _ in range(len(self.files.paths) + 1):
            if self.pipe is None:
                self._restart()
            try:
                (images,) = self.pipe.run()
                break
            except RuntimeError as e:
                self._recover(e)
        else:
            raise FDFastError(f"DALI kept failing to decode images under {str(self.files.root)!r}")
        self._handed_out()
        return _to_torch(images, self.device)

    def _handed_out(self) -> None:
        self.source.in_flight.popleft()

    def _suspects(self) -> set[int]:
        """Samples of the batches in flight (produced, not yet handed out)."""
        return {i for batch in self.source.in_flight for i in batch}

    def _decodes(self, i: int) -> bool:
        try:
            return decodes(self.files.source(i))
        except OSError:  # vanished
            return False

    def _recover(self, error: RuntimeError) -> None:
        """A decode failed: find the culprit(s) among the batches in flight, mark them, rebuild."""
        suspects = self._suspects()
        culprits = sorted(i for i in suspects if not self._decodes(i))
        self.pipe = None  # after a critical error a DALI pipeline cannot run again
        if not culprits:
            if "decod" not in str(error).lower():
                raise error  # not about the data
            raise FDFastError(f"DALI failed to decode images that PIL decodes (one of {len(suspects)} files "
                              f"under {str(self.files.root)!r}); use data.loader=torch for this data. DALI "
                              f"said: {str(error).strip().splitlines()[-1][:300]}") from error
        for i in culprits:
            self._mark_bad(i)

    def close(self) -> None:
        self.pipe = None  # DALI frees the pipeline's threads and buffers with the object
        self.source = None


class _ShardSource:
    """External source beside DALI's WebDataset reader: for the plan's samples, in the order the reader reads
    them (cyclically, as the reader wraps around), crop anchors, shapes and flips."""

    def __init__(self, loader: "DaliShardLoader", ids: np.ndarray, seeds: np.ndarray):
        self.loader = weakref.proxy(loader)
        self.ids, self.seeds = ids, seeds
        self.calls = 0

    def positions(self, first_call: int, calls: int) -> np.ndarray:
        """Plan positions of ``calls`` batches from batch ``first_call`` on."""
        size = self.loader.order.batch_size
        return (np.arange(first_call * size, (first_call + calls) * size)) % len(self.ids)

    def __call__(self):
        ld = self.loader
        positions = self.positions(self.calls, 1)
        self.calls += 1
        return _crop_inputs([tuple(ld.files.dims[int(self.ids[p])]) for p in positions], self.seeds[positions], ld)


def _crop_inputs(sizes, seeds, loader) -> tuple[list, list, list]:
    """Per sample of (width, height) and seed: its crop anchor (x, y), crop shape (w, h) in pixels and flip, as DALI's
    external source takes them (`base.sample_crop`: the torch path's windows)."""
    anchors, shapes, flips = [], [], []
    for (width, height), seed in zip(sizes, seeds):
        top, left, h, w, flip = sample_crop(width, height, seed, loader.scale, loader.ratio, loader.hflip)
        anchors.append(np.array([left, top], dtype=np.float32))
        shapes.append(np.array([w, h], dtype=np.float32))
        flips.append(np.array(flip, dtype=np.int32))
    return anchors, shapes, flips


class DaliShardLoader(DaliFDLoader):
    """DALI on WebDataset shards: DALI's reader reads the bytes in `ShardOrder`'s order (see the module docstring).

    One pipeline per epoch (or per resume / recovery position): its "plan" is this rank's samples from the
    position to the end of the epoch, bad samples replaced by the next readable one (the torch path's rule).
    """

    def __init__(self, files, order, **kw):
        super().__init__(files, order, **kw)
        self.plan_epoch = -1
        self.plan_dir: str | None = None
        self.consumed = 0  # batches of the current pipeline handed out

    def _restart(self) -> None:
        import tempfile
        from fdfast.data.shards import dali_index_runs
        self.close()
        index, seeds = self.order.epoch(self.epoch)
        start = self.batch * self.order.batch_size
        ids = np.array([self._readable(int(i)) for i in index[start:]], dtype=np.int64)
        self.plan_dir = tempfile.mkdtemp(prefix="fdfast-dali-index-")
        self.plan_paths, self.plan_indexes = [], []
        for k, (shard, text) in enumerate(dali_index_runs(self.files, ids)):
            self.plan_indexes.append(f"{self.plan_dir}/{k:06d}.idx")
            with open(self.plan_indexes[-1], "w") as f:
                f.write(text)
            self.plan_paths.append(shard)
        self.plan_ids, self.plan_seeds = ids, seeds[start:]
        self.plan_epoch, self.consumed = self.epoch, 0
        self.pipe = self._build_pipeline()

    def _readable(self, i: int) -> int:
        n = len(self.files)
        while i in self.bad_index:  # _mark_bad stops the run before every sample is bad
            i = (i + 1) % n
        return i

    def _make_source(self):
        return _ShardSource(self, self.plan_ids, self.plan_seeds)

    def _inputs(self) -> list:
        from nvidia.dali import fn
        exts = sorted({self.files.exts[int(i)] for i in self.plan_ids})
        # the reader's order is the index files' order; every listed sample has its image: "error" keeps the reader
        # and the external source aligned (skipping a sample would shift every crop after it)
        encoded = fn.readers.webdataset(paths=self.plan_paths, index_paths=self.plan_indexes, ext=[";".join(exts)],
                                        random_shuffle=False, missing_component_behavior="error",
                                        case_sensitive_extensions=False, name="shards")
        dtypes = _SOURCE_TYPES[1:]
        rest = fn.external_source(source=self.source, num_outputs=len(dtypes), batch=True, dtype=_dali_types(dtypes))
        return [encoded, *rest]

    def _next_batch(self):
        if self.plan_epoch != self.epoch:
            self.pipe = None  # a new epoch: a new plan
        return super()._next_batch()

    def _handed_out(self) -> None:
        self.consumed += 1

    def _suspects(self) -> set[int]:
        positions = self.source.positions(self.consumed, PREFETCH + 2)  # DALI's queue and the reader's
        return {int(self.plan_ids[p]) for p in positions}

    def close(self) -> None:
        super().close()
        if self.plan_dir is not None:
            import shutil
            shutil.rmtree(self.plan_dir, ignore_errors=True)
            self.plan_dir = None


_SOURCE_TYPES = ("UINT8", "FLOAT", "FLOAT", "INT32")  # encoded, anchors, shapes, flips


def _dali_types(names) -> list:
    from nvidia.dali import types
    return [getattr(types, n) for n in names]


def _to_torch(batch, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor on `device` (one copy)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    tensor = batch.as_tensor()
    out = torch.empty(tensor.shape(), dtype=_torch_dtype(tensor), device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None
    feed_ndarray(tensor, out, cuda_stream=stream)
    return out


def _torch_dtype(tensor) -> torch.dtype:
    from nvidia.dali import types
    return {types.FLOAT: torch.float32, types.UINT8: torch.uint8}[tensor.dtype]
