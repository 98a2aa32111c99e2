"""Read only the base-model tensors an adapter touches (for ``weight_mode="delta"``).

A base can be a state dict, a diffusers model directory (the pipeline root with ``transformer/`` or the
transformer folder itself, sharded or not) or a Hub model id. Only the safetensors shards holding the
needed keys are opened, and only those keys are read from them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .errors import IncompatibleModelError, IntegrityError
from .weights import check_safetensors_path, normalize_keys

logger = logging.getLogger("clear_adapters")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"


def load_base_tensors(base, keys: list[str], *, subfolder: str = "transformer", revision: str | None = None,
                      token=None) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (upstream adapter names) of the base transformer, as float32 on CPU."""
    if isinstance(base, dict):
        tensors = normalize_keys(base)
        return {k: _need(tensors, k, "the base state dict").float() for k in keys}
    path = Path(str(base)).expanduser()
    if path.exists():
        folder = path / subfolder if (path / subfolder).is_dir() else path
        return _read_keys(keys, lambda name: folder / name, str(folder))

    from .hub import download

    locate = lambda name: download(str(base), f"{subfolder}/{name}", revision=revision, token=token)  # noqa: E731
    remote = _read_keys_remote(str(base), keys, subfolder, revision, token, locate)
    if remote is not None:
        return remote
    return _read_keys(keys, locate, str(base))


def _read_keys(keys, locate, where: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file = _group_by_shard(keys, _read_index(locate), where)
    out = {}
    for shard, wanted in by_file.items():
        file = check_safetensors_path(locate(shard))
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            available = set(fh.keys())
            for key in wanted:
                out[key] = _need_key(fh, available, key, where).float()
    return out


def _read_index(locate) -> dict | None:
    """The key -> shard file map of a sharded checkpoint, or None when it is one unsharded file."""
    try:
        path = Path(locate(INDEX_NAME))
        text = path.read_bytes()
    except (OSError, LookupError):  # no index file (locally or on the Hub: AdapterNotFoundError)
        return None
    return check_index(text, str(path))


def check_index(raw: bytes, where: str) -> dict[str, str]:
    """The ``weight_map`` of a shard index, refused unless it is well formed and names only plain shard
    files beside the index (an absolute path or ``../`` would read files outside the base model)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError; RecursionError: nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise IntegrityError(f"{where}: not a valid shard index ({reason})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise IntegrityError(f"{where}: not a valid shard index (expected a 'weight_map' object of tensor name -> "
                             "shard file name)")
    for shard in set(weight_map.values()):
        if not shard.endswith(".safetensors") or Path(shard).name != shard or "\\" in shard or "\0" in shard \
                or shard.startswith("."):
            raise IntegrityError(f"{where}: names the shard {shard[:200]!r}, which is not a .safetensors file "
                                 "beside the index (absolute paths and ../ are refused)")
    return weight_map


def _group_by_shard(keys, index: dict | None, where: str) -> dict[str, list[str]]:
    by_file: dict[str, list[str]] = {}
    for key in keys:
        shard = WEIGHTS_NAME if index is None else index.get(key)
        if shard is None:
            raise IncompatibleModelError(f"the base model at {where} has no tensor {key}; is it a FLUX transformer?")
        by_file.setdefault(shard, []).append(key)
    return by_file


def _need(tensors, key, where):
    if key not in tensors:
        raise IncompatibleModelError(f"{where} has no tensor {key}")
    return tensors[key]


def _need_key(fh, available, key, where):
    if key not in available:
        raise IncompatibleModelError(f"the base model at {where} has no tensor {key}")
    return fh.get_tensor(key)


# ------------------------------------------------------------------------------------------------ Hub ranges
#: Gaps smaller than this between wanted tensors are fetched too, to save requests.
RANGE_MERGE_GAP = 1 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _read_keys_remote(repo_id: str, keys, subfolder: str, revision, token, locate) -> dict[str, torch.Tensor] | None:
    """Read ``keys`` from the Hub with HTTP range requests (safetensors header, then only those tensors).

    FLUX.1-dev's transformer is ~24 GB; the tensors a CLEAR adapter touches are ~15% of it. Shards
    already in the local Hub cache are read from disk. Returns None (caller downloads whole shards)
    when the server does not answer range requests or the Hub is unreachable (offline: cache only).
    """
    import huggingface_hub
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return None
    try:
        index = _read_index(locate)
    except Exception:  # noqa: BLE001 - the Hub is unreachable: let the caller try the plain path
        return None
    by_file = _group_by_shard(keys, index, repo_id)
    out: dict[str, torch.Tensor] = {}
    fetched = requests = 0
    for shard, wanted in by_file.items():
        filename = f"{subfolder}/{shard}" if subfolder else shard
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
        if isinstance(cached, str):
            out.update(_read_keys(wanted, lambda name, path=cached: Path(path), f"{repo_id}/{filename}"))
            continue
        result = _fetch_tensors(repo_id, filename, wanted, revision, token)
        if result is None:
            return None
        tensors, nbytes, count = result
        out.update(tensors)
        fetched, requests = fetched + nbytes, requests + count
    if requests:
        logger.info("read %d base tensors (%.1f MB) of %s with %d range requests", len(keys), fetched / 1e6,
                    repo_id, requests)
    return out


def _fetch_tensors(repo_id, filename, wanted, revision, token):
    """(tensors, bytes fetched, requests) of ``wanted`` in one remote safetensors file, or None."""
    import struct

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision)
    headers = build_hf_headers(token=token)
    session = get_session()

    def get_range(start: int, end: int) -> bytes | None:  # inclusive end, as HTTP says
        response = session.get(url, headers={**headers, "Range": f"bytes={start}-{end}"})
        hf_raise_for_status(response)
        if response.status_code != 206:
            return None  # the server ignored the range: let the caller download the file instead
        return response.content

    try:
        head = get_range(0, 7)
        if head is None or len(head) != 8:
            return None
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000:
            raise IncompatibleModelError(f"{repo_id}/{filename} is not a safetensors file")
        header = json.loads(get_range(8, 8 + header_len - 1) or b"null")
    except IncompatibleModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - network trouble: fall back to the plain download path
        logger.debug("range requests to %s failed (%s); downloading whole files", repo_id, exc)
        return None
    if not isinstance(header, dict):
        return None
    data_start = 8 + header_len
    spans = []
    for key in wanted:
        info = header.get(key)
        if info is None:
            raise IncompatibleModelError(f"the base model at {repo_id} has no tensor {key}")
        begin, end = info["data_offsets"]
        spans.append((begin, end, key, info))
    spans.sort()
    groups: list[list] = []
    for span in spans:
        if groups and span[0] - groups[-1][-1][1] <= RANGE_MERGE_GAP:
            groups[-1].append(span)
        else:
            groups.append([span])
    tensors, fetched = {}, 0
    for group in groups:
        first, last = group[0][0], max(s[1] for s in group)
        blob = get_range(data_start + first, data_start + last - 1) if last > first else b""
        if blob is None or len(blob) != last - first:
            return None
        fetched += len(blob)
        for begin, end, key, info in group:
            dtype = _DTYPES.get(info["dtype"])
            if dtype is None:
                raise IncompatibleModelError(f"{key}: unsupported safetensors dtype {info['dtype']}")
            raw = bytearray(blob[begin - first:end - first])
            tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            tensors[key] = tensor.reshape(info["shape"]).float()
    return tensors, fetched, 2 + len(groups)
