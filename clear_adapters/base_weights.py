"""Read only the base-model tensors an adapter touches (for ``weight_mode="delta"``).

A base can be

* a built-in pipeline name (``"toy"``, ``"tiny"``: :mod:`clear_adapters.pipelines`): its transformer;
* a state dict, keyed as the transformer names its tensors or with one wrapper prefix (``tr.``), which
  is found and removed;
* an ``nn.Module``: a FLUX transformer or a user's wrapper around one (its state dict, as above);
* a local ``.safetensors`` file;
* a local diffusers model directory: the pipeline root with ``transformer/`` or the transformer folder
  itself, sharded (``diffusion_pytorch_model.safetensors.index.json``) or not;
* a Hub model id (the same layouts). Shard headers come from huggingface_hub's safetensors metadata
  reader and the wanted byte ranges from ``HfFileSystem``, both pinned to the commit the index was read
  at, so authentication, redirects, Xet storage and revisions are handled by the library that owns
  them. FLUX.1-dev's transformer is ~24 GB; the tensors a CLEAR adapter touches are ~15% of it.
  Shards already in the local Hub cache are read from disk; offline, only the cache is used.

An index is data from someone else: it must be a JSON object whose ``weight_map`` maps tensor names
to shard file names inside the model folder (no absolute paths, no ``..``).
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path, PurePosixPath

import torch

from .errors import (AdapterNotFoundError, ClearAdapterError, HubAuthError, HubError, IncompatibleModelError,
                     IntegrityError)
from .weights import check_safetensors_path

logger = logging.getLogger("clear_adapters")

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
#: Gaps smaller than this between wanted tensors are fetched too, to save requests.
RANGE_MERGE_GAP = 1 << 20
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def load_base_tensors(base, keys: list[str], *, subfolder: str = "transformer", revision: str | None = None,
                      token=None, cache_dir=None, local_files_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors ``keys`` (upstream adapter names) of the base transformer, as float32 on CPU."""
    if isinstance(base, torch.nn.Module):
        base = getattr(base, "_orig_mod", base).state_dict()  # references, not copies
        where = "the base module"
    else:
        where = "the base state dict"
    if isinstance(base, dict):
        names = _match_prefix(keys, base.keys(), where)
        return {k: base[names[k]].detach().float().cpu() for k in keys}
    if not isinstance(base, (str, Path)):
        raise ClearAdapterError(f"base must be a state dict, an nn.Module, a .safetensors file, a model directory "
                                f"or a Hub model id, got {type(base).__name__}")
    from .pipelines import is_builtin, load_pipeline

    if isinstance(base, str) and is_builtin(base):  # "toy", "tiny": small pipelines shipped or built locally
        return load_base_tensors(load_pipeline(base).transformer, keys)
    path = Path(str(base)).expanduser()
    if path.is_file():
        return _read_local(keys, None, path.parent, path.name, str(path))
    if path.is_dir():
        folder = path / subfolder if subfolder and (path / subfolder).is_dir() else path
        index = _local_index(folder)
        if index is None and not (folder / WEIGHTS_NAME).is_file():
            raise IncompatibleModelError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}; pass a diffusers "
                                         "FLUX model folder (or its pipeline folder), a .safetensors file or a "
                                         "state dict")
        return _read_local(keys, index, folder, WEIGHTS_NAME, str(folder))
    if str(base).startswith(("/", ".", "~")) or str(base).endswith(".safetensors"):
        raise ClearAdapterError(f"base {str(base)!r}: no such file or directory")
    return _read_hub(str(base), keys, subfolder, revision, token, cache_dir, local_files_only)


# ------------------------------------------------------------------------------------------------ names
def _match_prefix(keys, available, where: str) -> dict[str, str]:
    """needed key -> the name it has in ``available``: itself, or one prefix shared by every key.

    A wrapper's state dict names the transformer's tensors ``<attribute>.<name>``; one consistent
    prefix is unambiguous and removed. Several (a wrapper holding two FLUX models) are not guessed.
    """
    available = set(available)
    if all(k in available for k in keys):
        return {k: k for k in keys}
    first = keys[0]
    prefixes = sorted({name[:-len(first)] for name in available
                       if name.endswith("." + first) and all(name[:-len(first)] + k in available for k in keys)})
    if len(prefixes) == 1:
        logger.info("%s names the transformer's tensors with the prefix %r; reading them from there", where,
                    prefixes[0])
        return {k: prefixes[0] + k for k in keys}
    if len(prefixes) > 1:
        raise IncompatibleModelError(f"{where} holds the transformer's tensors under several prefixes "
                                     f"({', '.join(repr(p) for p in prefixes)}); pass the base transformer itself "
                                     f"(e.g. base=wrapper.{prefixes[0].rstrip('.')}) or its own state dict")
    missing = next(k for k in keys if k not in available)
    near = sorted(name for name in available if name.endswith("." + missing))
    hint = (f" (it has {near[0]!r}: keys under a prefix must all be there to be matched)" if near else
            "; is it the state dict of a FLUX transformer (or of a wrapper whose attribute holds one)?")
    raise IncompatibleModelError(f"{where} has no tensor {missing}{hint}")


# ------------------------------------------------------------------------------------------------ index
def _parse_index(text: str, where: str) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index, checked: tensor name -> plain shard file name."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"{where}: not valid JSON ({type(exc).__name__}); the shard index is corrupt") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise IntegrityError(f"{where}: expected a JSON object with a 'weight_map' of tensor name -> shard file "
                             "name; the shard index is malformed")
    for shard in set(weight_map.values()):
        parts = PurePosixPath(shard).parts
        if not shard or "\\" in shard or shard.startswith("/") or ".." in parts or len(parts) != 1 \
                or not shard.endswith(".safetensors"):
            raise IntegrityError(f"{where}: refuses shard {shard!r}: shards must be .safetensors files beside the "
                                 "index (no folders, absolute paths or '..')")
    return weight_map


def _local_index(folder: Path) -> dict[str, str] | None:
    index_path = folder / INDEX_NAME
    if not index_path.is_file():
        return None
    weight_map = _parse_index(index_path.read_text(encoding="utf-8", errors="replace"), str(index_path))
    root = folder.resolve()
    for shard in set(weight_map.values()):  # a symlinked shard must not lead out of the model folder
        if not (folder / shard).resolve().is_relative_to(root):
            raise IntegrityError(f"{index_path}: refuses shard {shard!r}: it resolves outside {folder}")
    return weight_map


def _group_by_shard(keys, index: dict[str, str] | None, single: str, where: str) -> dict[str, list[str]]:
    """shard file -> the needed keys it holds (``single`` when there is no index)."""
    if index is None:
        return {single: list(keys)}
    names = _match_prefix(keys, index.keys(), f"the base model at {where}")
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(index[names[key]], []).append(key)
    return by_file


# ------------------------------------------------------------------------------------------------ local
def _read_local(keys, index, folder: Path, single: str, where: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for shard, wanted in _group_by_shard(keys, index, single, where).items():
        file = check_safetensors_path(folder / shard)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                names = _match_prefix(wanted, fh.keys(), f"the base model at {file}")
                for key in wanted:
                    out[key] = fh.get_tensor(names[key]).float()
        except ClearAdapterError:
            raise
        except Exception as exc:  # safetensors raises its own error types for truncated data
            raise IntegrityError(f"{file}: cannot read safetensors data ({exc})") from None
    return out


# ------------------------------------------------------------------------------------------------ Hub
def _read_hub(repo_id: str, keys, subfolder: str, revision, token, cache_dir, local_files_only):
    from huggingface_hub import constants

    if local_files_only or constants.is_offline_mode():
        return _read_hub_cache(repo_id, keys, subfolder, revision, token, cache_dir, local_files_only)
    try:
        return _read_hub_ranges(repo_id, keys, subfolder, revision, token, cache_dir)
    except (HubAuthError, AdapterNotFoundError):  # an answer ("no", "not found"): the cache would not change it
        raise
    except HubError as exc:  # the Hub cannot serve now: files cached earlier may still do
        logger.info("reading %s from the Hub failed (%s); trying the local Hub cache", repo_id, exc)
        return _read_hub_cache(repo_id, keys, subfolder, revision, token, cache_dir, True)


def _hub_layout(repo_id: str, subfolder: str, revision, token):
    """(commit, folder in the repo, has index, has single file) for a model repo, in one request."""
    from .hub import hub_api, translate_errors

    with translate_errors(repo_id, revision=revision, action="read the base model", token=token):
        info = hub_api(token).model_info(repo_id, revision=revision, token=token)
    files = {s.rfilename for s in info.siblings or []}
    for folder in ([subfolder] if subfolder else []) + [""]:  # the pipeline layout, else a transformer repo
        prefix = f"{folder}/" if folder else ""
        has_index, has_single = prefix + INDEX_NAME in files, prefix + WEIGHTS_NAME in files
        if has_index or has_single:
            return info.sha, folder, has_index, has_single
    raise IncompatibleModelError(f"{repo_id} has no {WEIGHTS_NAME} (or its shard index) in "
                                 f"{subfolder + '/ or ' if subfolder else ''}its root; is it a diffusers FLUX model?")


def _read_hub_ranges(repo_id: str, keys, subfolder: str, revision, token, cache_dir) -> dict[str, torch.Tensor]:
    from huggingface_hub import try_to_load_from_cache

    from .hub import download

    commit, folder, has_index, _ = _hub_layout(repo_id, subfolder, revision, token)
    prefix = f"{folder}/" if folder else ""
    index = None
    if has_index:  # at the commit just listed: the shards read below belong to this index
        index_path = download(repo_id, prefix + INDEX_NAME, revision=commit, token=token, cache_dir=cache_dir)
        index = _parse_index(index_path.read_text(encoding="utf-8", errors="replace"),
                             f"{repo_id}/{prefix}{INDEX_NAME}")
    out: dict[str, torch.Tensor] = {}
    fetched = requests = 0
    for shard, wanted in _group_by_shard(keys, index, WEIGHTS_NAME, repo_id).items():
        filename = prefix + shard
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=commit)
        if isinstance(cached, str):
            out.update(_read_local(wanted, None, Path(cached).parent, Path(cached).name, f"{repo_id}/{filename}"))
            continue
        result = _fetch_tensors(repo_id, filename, wanted, commit, token)
        if result is None:  # the server ignored the ranges: fetch the whole shard through the cache
            path = download(repo_id, filename, revision=commit, token=token, cache_dir=cache_dir)
            out.update(_read_local(wanted, None, path.parent, path.name, f"{repo_id}/{filename}"))
            continue
        tensors, nbytes, count = result
        out.update(tensors)
        fetched, requests = fetched + nbytes, requests + count
    if requests:
        logger.info("read %d base tensors (%.1f MB) of %s@%s with %d range requests", len(keys), fetched / 1e6,
                    repo_id, commit[:8], requests)
    return out


def _read_hub_cache(repo_id: str, keys, subfolder: str, revision, token, cache_dir, local_only: bool):
    """The same tensors from files in the local Hub cache (downloaded whole when online)."""
    from .errors import OfflineError
    from .hub import download

    def fetch(name):
        return download(repo_id, name, revision=revision, token=token, cache_dir=cache_dir,
                        local_files_only=local_only)

    for folder in ([subfolder] if subfolder else []) + [""]:
        prefix = f"{folder}/" if folder else ""
        try:
            index_path = fetch(prefix + INDEX_NAME)
        except (AdapterNotFoundError, OfflineError):
            index_path = None
        if index_path is not None:
            index = _parse_index(index_path.read_text(encoding="utf-8", errors="replace"),
                                 f"{repo_id}/{prefix}{INDEX_NAME}")
        else:
            try:
                fetch(prefix + WEIGHTS_NAME)
            except (AdapterNotFoundError, OfflineError):
                continue
            index = None
        out = {}
        for shard, wanted in _group_by_shard(keys, index, WEIGHTS_NAME, repo_id).items():
            path = fetch(prefix + shard)
            out.update(_read_local(wanted, None, path.parent, path.name, f"{repo_id}/{prefix}{shard}"))
        return out
    raise OfflineError(f"the base model {repo_id} is not in the local Hub cache"
                       f"{' (local_files_only=True)' if local_only else ''}; load it once online, or pass base= a "
                       "local directory or state dict")


def _fetch_tensors(repo_id: str, filename: str, wanted, commit: str, token):
    """(tensors, bytes fetched, requests) of ``wanted`` in one remote safetensors file, or None when the
    server does not answer range requests."""
    from huggingface_hub import HfFileSystem

    from .hub import hub_api, translate_errors

    where = f"{repo_id}/{filename}"
    with translate_errors(repo_id, filename=filename, revision=commit, action="read", token=token):
        header = hub_api(token).parse_safetensors_file_metadata(repo_id, filename, revision=commit, token=token)
        # skip_instance_cache: no filesystem object (with its listings) outlives this call
        fs = HfFileSystem(token=token, skip_instance_cache=True)
        try:
            handle = fs.open(f"{repo_id}/{filename}", "rb", revision=commit, cache_type="none")
        except FileNotFoundError:
            raise IntegrityError(f"{where} vanished at commit {commit} while reading it") from None
        with handle as fh:
            head = fh.read(8)
            if len(head) != 8:
                return None
            data_start = 8 + struct.unpack("<Q", head)[0]
            spans = []
            for key in wanted:
                info = header.tensors.get(key)
                if info is None:
                    raise IncompatibleModelError(f"the base model at {where} has no tensor {key}")
                begin, end = info.data_offsets
                dtype = _DTYPES.get(info.dtype)
                if dtype is None:
                    raise IncompatibleModelError(f"{where}: {key} has dtype {info.dtype}, not a float/int type "
                                                 "clear_adapters reads")
                numel = 1
                for dim in info.shape:
                    numel *= dim
                if end - begin != numel * dtype.itemsize or begin < 0:
                    raise IntegrityError(f"{where}: the header gives {key} {end - begin} bytes for shape "
                                         f"{info.shape} {info.dtype}; the file is corrupt")
                spans.append((begin, end, key, info.shape, dtype))
            if data_start + max(s[1] for s in spans) > fh.size:
                raise IntegrityError(f"{where}: the header points past the end of the file; the file is corrupt")
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
                fh.seek(data_start + first)
                blob = fh.read(last - first) if last > first else b""
                if len(blob) != last - first:
                    return None
                fetched += len(blob)
                for begin, end, key, shape, dtype in group:
                    raw = bytearray(blob[begin - first:end - first])
                    tensor = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
                    tensors[key] = tensor.reshape(shape).float()
    # requests: the header (one or two), the 8-byte length, one per group (listings not counted)
    return tensors, fetched, 2 + len(groups)
