"""Each rank materialises only its shard of its member.

The model is built on the meta device (its buffers real: rotary tables, Gemma's embedding scale),
DeepSpeed's AutoTP shards the meta model, `init_inference` allocates the shard's tensors on the
rank's device, and every parameter is then read from the safetensors files, only its slice, with
plain reads (not a memory map: mapped pages count in a process's resident memory). A rank's host
memory is its shard plus a bounded read buffer, not the whole model. Every parameter must be found and every buffer restored:
nothing is left uninitialised silently (DeepSpeed's own meta loading leaves Gemma-3's norms
empty; ../shared/spec/GPU-NOTES.md, note 17)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .world import LayoutError, World, shard_member

# AutoTP layers whose shard is one contiguous slice of the checkpoint's tensor along one dim
CONTIGUOUS = ("LinearLayer", "LinearAllreduce", "LmHeadLinearAllreduce", "VocabParallelLinear")


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CHUNK_BYTES = 16 * 2**20   # read buffer for a column slice


class SafetensorsFile:
    """A safetensors file read with os.pread: a tensor whole, a range of rows, or a range of
    columns of a 2-D tensor (row block by row block, at most CHUNK_BYTES at a time)."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY)
        size = int.from_bytes(os.pread(self.fd, 8, 0), "little")
        self.header = {k: v for k, v in json.loads(os.pread(self.fd, size, 8)).items() if k != "__metadata__"}
        self.base = 8 + size

    def keys(self):
        return self.header.keys()

    def shape(self, key: str) -> list[int]:
        return self.header[key]["shape"]

    def _read_into(self, view: memoryview, offset: int):
        """Fill `view` (bytes) from the file at `offset`, with no intermediate copy."""
        done = 0
        while done < len(view):
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                raise OSError(f"short read at byte {offset + done}")
            done += got

    def read_into(self, key: str, param: torch.Tensor, dim: int | None = None, start: int = 0):
        """Copy tensor `key`, or its slice [start, start + param.shape[dim]) along `dim`, into
        `param`. Whole tensors and row slices of the same dtype on the CPU are read straight into
        the parameter's memory; anything else goes through a buffer of at most CHUNK_BYTES
        (converted to the parameter's dtype, sent to its device, chunk by chunk)."""
        meta = self.header[key]
        dtype, shape = DTYPES[meta["dtype"]], meta["shape"]
        begin = self.base + meta["data_offsets"][0]
        item = torch.empty((), dtype=dtype).element_size()
        row = item * (int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1)
        if param.numel() == 0:  # an uneven split can give a rank nothing (1 KV head at tp 2)
            return
        if dim is None or dim == 0:
            offset = begin + (start * row if dim == 0 else 0)
            if param.device.type == "cpu" and param.dtype == dtype and param.is_contiguous():
                self._read_into(memoryview(param.view(-1).view(torch.uint8).numpy()), offset)
                return
            flat, per = param.view(-1), max(1, CHUNK_BYTES // item)
            for i in range(0, flat.numel(), per):
                n = min(per, flat.numel() - i)
                buffer = bytearray(n * item)
                self._read_into(memoryview(buffer), offset + i * item)
                flat[i:i + n].copy_(torch.frombuffer(buffer, dtype=dtype))
            return
        if dim != 1 or len(shape) != 2:
            raise LayoutError(f"sharded loading: cannot slice {key} {shape} along dim {dim}")
        rows, width = max(1, CHUNK_BYTES // row), param.shape[1]
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            buffer = bytearray(n * row)
            self._read_into(memoryview(buffer), begin + r * row)
            param[r:r + n].copy_(torch.frombuffer(buffer, dtype=dtype).view(n, shape[1])[:, start:start + width])

    def close(self):
        os.close(self.fd)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file that holds it."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {k: model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        f = SafetensorsFile(path)
        found.update({k: path for k in f.keys()})
        f.close()
    return found


def empty_model(model_dir: Path, member, dtype: torch.dtype):
    """The member's model with meta parameters and real buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=member.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=member.trust_remote_code)
    return model.eval()


def shard_slice(model, name: str, shape: tuple, full: list[int]):
    """(dim, start) of this rank's slice of checkpoint tensor `name`, or None if it is whole."""
    if list(shape) == list(full):
        return None
    differ = [d for d, (a, b) in enumerate(zip(shape, full)) if a != b]
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    sizes, index = getattr(owner, "_partition_sizes", None), getattr(owner, "tp_index", None)
    if type(owner).__name__ in CONTIGUOUS and (sizes is None or index is None):
        raise LayoutError(internals_missing(type(owner).__name__))
    if type(owner).__name__ not in CONTIGUOUS or len(differ) != 1:
        raise LayoutError(f"sharded loading cannot place {name} ({type(owner).__name__}, shard {list(shape)} of "
                          f"{full}): set loading = \"full\" for this member")
    dim = differ[0]
    if sum(sizes) != full[dim] or sizes[index] != shape[dim]:
        raise LayoutError(f"sharded loading: {name}'s shard {list(shape)} does not match the split {sizes} of {full}")
    return dim, sum(sizes[:index])


def internals_missing(layer: str) -> str:
    """Sharded loading reads two attributes of DeepSpeed's AutoTP layers that are not public API;
    another DeepSpeed may not have them."""
    from ..versions import TESTED, installed
    return (f"sharded loading reads AutoTP's _partition_sizes and tp_index, which {layer} of deepspeed "
            f"{installed('deepspeed')} does not have (tested with deepspeed{TESTED['deepspeed']}): install "
            f"'deepspeed{TESTED['deepspeed']}', or set loading = \"full\" for this member")


def fill_from_checkpoint(model, model_dir: Path, tied: bool):
    """Every parameter of the (sharded, allocated) model from the checkpoint, only its slice."""
    files = weight_files(model_dir)
    handles: dict[Path, SafetensorsFile] = {}
    try:
        for name, param in model.named_parameters():
            key = name
            if key not in files and tied and name.endswith("lm_head.weight"):
                key = next((k for k in files if k.endswith("embed_tokens.weight")), key)  # tied to the embedding
            if key not in files:
                raise LayoutError(f"sharded loading: {model_dir} has no tensor {name!r} (set loading = \"full\")")
            if files[key] not in handles:
                handles[files[key]] = SafetensorsFile(files[key])
            f = handles[files[key]]
            where = shard_slice(model, name, tuple(param.shape), f.shape(key))
            with torch.no_grad():
                f.read_into(key, param.data, *(where or (None, 0)))
    finally:
        for f in handles.values():
            f.close()


def load_shard(model_dir: Path, member, world: World, dtype: torch.dtype):
    """This rank's shard of `member`, on the rank's device, read slice by slice."""
    from ..members.sources import check_weights_safe
    check_weights_safe(model_dir, member)  # safetensors only
    model = empty_model(model_dir, member, dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    sharded = shard_member(model, world, dtype)  # AutoTP on meta tensors; init_inference allocates
    with torch.no_grad():
        for name, b in sharded.named_buffers():
            if name not in buffers:
                raise LayoutError(f"sharded loading: buffer {name!r} appeared while sharding (set loading = \"full\")")
            b.copy_(buffers[name].to(b.device, b.dtype) if b.dtype.is_floating_point else buffers[name].to(b.device))
    fill_from_checkpoint(sharded, model_dir, tied)
    return sharded
