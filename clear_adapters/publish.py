"""Publishing: render an adapter's model card and ``push`` the adapter directory to the Hugging Face Hub.

``push`` validates the directory locally first (config <-> weights <-> sha256), renders ``README.md``
from ``model_cards/adapter_card.md.jinja`` (Hub metadata, a usage snippet, the attention-FLOP table and,
when given, the compatibility matrix) and uploads ``clear_config.json``, the weights and the card in one
commit. The card is rendered in memory for the target repo id (a ``README.md`` in the directory, written
by ``save_adapter`` with a local path in its snippet, is not uploaded) and the directory is not modified;
that is why the upload is one ``create_commit`` with explicit files rather than ``upload_folder`` (which
it wraps). Unchanged files are detected against the remote blob hashes first, so pushing an unchanged
adapter makes no commit and no upload.

Card metadata choices:

* ``library_name: clear-adapters`` rather than ``diffusers``: the Hub turns ``diffusers`` on an adapter
  into a "Use this model" snippet (``DiffusionPipeline.from_pretrained`` + ``load_lora_weights``) that
  cannot load these files; an unknown library shows no snippet, and the card's own snippet is the one
  that works. ``diffusers`` stays discoverable as a tag.
* ``license`` follows the base model: the weights are fine-tunes of its projections.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .artifact import CARD_NAME, CONFIG_NAME, check_adapter_dir, validate_config
from .errors import ClearAdapterError, IntegrityError, InvalidArgumentError
from .validate import check_repo_id, check_revision
from .weights import MAX_HEADER_BYTES

logger = logging.getLogger("clear_adapters")

TEMPLATE = "adapter_card.md.jinja"
LIBRARY_NAME = "clear-adapters"
TAGS = ("clear", "linear-attention", "flux", "diffusers", "text-to-image")
PIPELINE_TAG = "text-to-image"

_DEV_LICENSE = {"license": "other", "license_name": "flux-1-dev-non-commercial-license",
                "license_link": "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"}
_APACHE = {"license": "apache-2.0"}

#: FLUX.1-dev shapes for the card's FLOP table: heads, head dim, text tokens, pixels per token, layers.
FLUX_DEV_SHAPE = {"heads": 24, "head_dim": 128, "text_len": 512, "pixels_per_token": 16, "layers": 57}
TABLE_RESOLUTIONS = (("1K", 1024), ("2K", 2048), ("4K", 4096))

_REVISION_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def license_for(base_model: str | None) -> dict:
    """Hub licence metadata for an adapter of ``base_model``.

    FLUX.1-dev and its ``-dev`` siblings (Krea, Kontext, Fill, ...) are under the FLUX.1 [dev]
    non-commercial licence, FLUX.1-schnell under Apache-2.0; anything else is ``other`` (its
    licence is whatever the base model's is — the card says so).
    """
    if not base_model:
        return {"license": "other"}
    owner, _, name = base_model.lower().partition("/")
    if owner == "black-forest-labs" and name.startswith("flux.1"):
        if name == "flux.1-schnell":
            return dict(_APACHE)
        if name.endswith("-dev"):
            return dict(_DEV_LICENSE)
    return {"license": "other"}


# ---------------------------------------------------------------------------------------------- matrix
def read_matrix_report(path: str | Path) -> dict:
    """Read a compatibility-matrix report written by ``clear-adapters matrix``.

    ``path``: the report's ``matrix.md``, its ``matrix.json`` or their directory. Returns
    ``{"cases": [...], "meta": {...}, "markdown": str | None}``; ``cases`` are dicts with ``name``,
    ``plugin``, ``psnr``, ``ssim``, ``exact_at_full_window``, ``passed``. Without the JSON the
    Markdown is embedded as it is.
    """
    path = Path(path)
    if path.is_dir():
        json_path, md_path = path / "matrix.json", path / "matrix.md"
    elif path.suffix.lower() == ".json":
        json_path, md_path = path, path.with_suffix(".md")
    else:
        json_path, md_path = path.with_suffix(".json"), path
    if not json_path.is_file() and not md_path.is_file():
        raise ClearAdapterError(f"no compatibility-matrix report at {path}: expected matrix.md / matrix.json "
                                "as written by `clear-adapters matrix`")
    try:
        markdown = md_path.read_text(encoding="utf-8") if md_path.is_file() else None
    except ValueError as exc:  # not UTF-8
        raise IntegrityError(f"{md_path}: not a UTF-8 text file ({exc})") from None
    if not json_path.is_file():
        return {"cases": [], "meta": {}, "markdown": markdown}
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise IntegrityError(f"{json_path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    meta: dict = {}
    if isinstance(data, dict):
        meta = _report_meta(data)
        data = data.get("cases")
    if not isinstance(data, list) or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in data):
        raise IntegrityError(f"{json_path}: expected a list of cases (each an object with a 'name'), "
                             "or an object with such a 'cases' list")
    return {"cases": data, "meta": meta, "markdown": markdown}


def _report_meta(report: dict) -> dict:
    """The run settings worth showing on a card. Not the adapter path (it may be a local directory)
    nor the prompt or timings; a local pipeline directory by its name only."""
    from .reports import shown_source

    meta = {}
    if report.get("pipeline"):
        meta["pipeline"] = shown_source(report["pipeline"])
    if isinstance(report.get("hardware"), str):
        meta["hardware"] = report["hardware"]
    if isinstance(report.get("width"), int) and isinstance(report.get("height"), int):
        meta["size"] = f"{report['width']}×{report['height']} px"
    for key in ("steps", "seed", "device", "dtype"):
        if isinstance(report.get(key), (str, int, float)) and not isinstance(report.get(key), bool):
            meta[key] = report[key]
    versions = report.get("versions")
    if isinstance(versions, dict):
        for key in ("clear-adapters", "torch", "diffusers", "cuda_device"):
            if isinstance(versions.get(key), str):
                meta[key] = versions[key]
    return meta


def _format_cases(cases: list[dict]) -> list[dict]:
    def number(value, unit=""):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "—"
        if math.isinf(value):
            return "∞ (identical)"
        return f"{value:.2f}{unit}" if unit else f"{value:.4f}"

    def flag(value):
        return "—" if value is None else ("yes" if value else "no")

    rows = []
    for case in cases:
        status = case.get("status", "ok")
        psnr = case.get("psnr")
        if psnr is None and status == "ok" and case.get("passed") is not None:
            psnr = math.inf  # the matrix writes identical images' infinite PSNR as null (JSON has no inf)
        passed = case.get("passed")
        verdict = "skipped" if status == "skipped" or passed is None else ("✅" if passed else "❌")
        if status == "error":
            verdict = "❌ error"
        rows.append({"name": _cell(case.get("name")), "plugin": _cell(case.get("plugin") or "—"),
                     "psnr": number(psnr, " dB"), "ssim": number(case.get("ssim")),
                     "exact": flag(case.get("exact_at_full_window")), "passed": verdict})
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


#: Pipelines the matrix knows that stand in for a real model; named on cards for what they are.
STAND_IN_PIPELINES = {"tiny": "clear-adapters' random-weight test pipeline"}


def matrix_is_foreign(report: dict, base_model: str | None) -> str | None:
    """Why a matrix report does not describe an adapter for ``base_model`` (None when it does).

    It does when the report's pipeline is the base model or a variant of it: the same Hub owner and a
    name that extends the base's (``FLUX.1-dev`` -> ``FLUX.1-dev-fp8``), compared case-insensitively.
    A report without a recorded pipeline, a local pipeline directory or a stand-in (``tiny``) does not.
    """
    pipeline = (report.get("meta") or {}).get("pipeline")
    if not pipeline:
        return "the report does not record which pipeline produced it (matrix.md without its matrix.json)"
    if not base_model:
        return f"the adapter records no base_model to compare the report's pipeline {pipeline!r} with"
    if pipeline in STAND_IN_PIPELINES:
        return f"it was run on {pipeline!r} ({STAND_IN_PIPELINES[pipeline]}), not on {base_model}"
    if not _REPO_ID.match(pipeline):
        return f"it was run on a local pipeline ({pipeline!r}) that cannot be checked against {base_model}"
    if _same_or_variant(pipeline, base_model):
        return None
    return f"it was run on {pipeline}, which is not {base_model} or a variant of it"


def _same_or_variant(pipeline: str, base_model: str) -> bool:
    owner, _, name = pipeline.lower().partition("/")
    base_owner, _, base_name = base_model.lower().partition("/")
    if owner != base_owner:
        return False
    short, long = sorted((name, base_name), key=len)
    return name == base_name or (long.startswith(short) and long[len(short)] in "-_.")


def _matrix_source(report: dict, base_model: str | None) -> dict:
    """Where a card's compatibility numbers come from, in words (always shown with the table)."""
    meta = report.get("meta") or {}
    pipeline = meta.get("pipeline")
    return {"pipeline": pipeline or "an unrecorded pipeline", "note": STAND_IN_PIPELINES.get(pipeline or ""),
            "size": meta.get("size") or "an unrecorded size", "hardware": meta.get("hardware") or "unrecorded hardware",
            "foreign": matrix_is_foreign(report, base_model),
            "settings": {k: v for k, v in meta.items() if k not in ("pipeline", "size", "hardware")}}


def install_command() -> tuple[str, str]:
    """(the command that installs clear-adapters, the page to link), from the installed package's project
    URLs (pyproject.toml), so a card never points at an index the library is not published on."""
    from importlib import metadata

    try:
        entries = metadata.metadata("clear-adapters").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        entries = []
    urls = dict(entry.split(", ", 1) for entry in entries if ", " in entry)
    repository = urls.get("Repository") or urls.get("Source")
    if repository:
        return f'pip install "clear-adapters @ git+{repository}"', urls.get("Homepage") or repository
    return "pip install clear-adapters", "https://pypi.org/project/clear-adapters/"


# ---------------------------------------------------------------------------------------------- card
def flop_table(window_size: float, down_factor: int = 1) -> list[dict]:
    """Attention TFLOPs per denoising step (all 57 layers) at 1K/2K/4K for FLUX.1-dev shapes."""
    from .config import ClearConfig
    from .geometry import Geometry

    s = FLUX_DEV_SHAPE
    config = ClearConfig(window_size, down_factor)
    rows = []
    for label, px in TABLE_RESOLUTIONS:
        side = px // s["pixels_per_token"]
        geometry = Geometry.from_grid(side, side, s["text_len"])
        full = geometry.attention_flops(s["head_dim"], s["heads"]) * s["layers"]
        clear = geometry.attention_flops(s["head_dim"], s["heads"], config) * s["layers"]
        rows.append({"label": label, "pixels": f"{px}×{px}", "tokens": geometry.total_len,
                     "full_tflops": f"{full / 1e12:,.1f}", "clear_tflops": f"{clear / 1e12:,.1f}",
                     "fraction": f"{clear / full:.1%}", "speedup": f"{full / clear:.1f}×"})
    return rows


def _usage(base_model: str | None) -> dict:
    name = (base_model or "").lower()
    if name.endswith("flux.1-schnell"):
        return {"steps": 4, "guidance": "0.0"}
    return {"steps": 28, "guidance": "3.5"}


def _provenance_lines(provenance) -> list[str]:
    if provenance is None:
        return []
    if isinstance(provenance, str):
        return [provenance]
    lines = []
    for key, value in provenance.items():
        text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
        lines.append(f"{key}: {text}")
    return lines


def render_card(config: dict, *, repo_id: str | None = None, revision: str | None = None,
                source: str | None = None, matrix: dict | str | Path | None = None) -> str:
    """The ``README.md`` of an adapter: Hub YAML metadata + usage, pattern, FLOPs, compatibility.

    ``repo_id`` (and ``revision``, for a branch other than main) go into the usage snippet; without
    them ``source`` (a local path) does. ``matrix`` is a report (see :func:`read_matrix_report`) or
    its path.
    """
    from huggingface_hub import ModelCard, ModelCardData

    validate_config(dict(config))
    if matrix is not None and not isinstance(matrix, dict):
        matrix = read_matrix_report(matrix)
    base_model = config.get("base_model")
    metadata = dict(base_model=base_model, base_model_relation="adapter" if base_model else None,
                    library_name=LIBRARY_NAME, pipeline_tag=PIPELINE_TAG, tags=list(TAGS), **license_for(base_model))
    card_data = ModelCardData(**{k: v for k, v in metadata.items() if v is not None})
    template = resources.files("clear_adapters.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    load_source = repo_id or source or "path/to/adapter"
    window, down = config["window_size"], config.get("down_factor", 1)
    card = ModelCard.from_template(
        card_data, template_str=template,
        title=f"CLEAR adapter {repo_id.split('/')[-1]}" if repo_id else "CLEAR adapter",
        base_model=base_model, repo_id=repo_id, load_source=load_source,
        revision=revision if revision and revision != "main" else None,
        window_size=window, down_factor=down, weight_mode=config.get("weight_mode", "replace"),
        layer_count=len(config.get("layers") or []), weights=config["weights"], sha256=config.get("sha256"),
        trained_resolution=config.get("trained_resolution"),
        proportional_attention=config.get("proportional_attention", False),
        base_revision=config.get("base_revision"), format_version=config["format_version"],
        provenance=_provenance_lines(config.get("provenance")), license_info=license_for(base_model),
        flops=flop_table(window, down), shape=FLUX_DEV_SHAPE,
        matrix_rows=_format_cases(matrix["cases"]) if matrix else [],
        matrix_passed=sum(1 for c in matrix["cases"] if c.get("passed") is True) if matrix else 0,
        matrix_run=sum(1 for c in matrix["cases"] if c.get("passed") is not None) if matrix else 0,
        matrix_source=_matrix_source(matrix, base_model) if matrix else None,
        install_command=install_command()[0], library_url=install_command()[1],
        matrix_markdown=_strip_title(matrix.get("markdown")) if matrix and not matrix["cases"] else None,
        **_usage(base_model),
    )
    return str(card).rstrip("\n") + "\n"


def _strip_title(markdown: str | None) -> str | None:
    if not markdown:
        return None
    lines = markdown.strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]  # the card already has headings; a second H1 would break its outline
    return "\n".join(lines).strip()


# ---------------------------------------------------------------------------------------------- push
@dataclass(frozen=True)
class PushResult:
    """What :func:`push` did: where, which commit, and whether anything changed."""

    repo_id: str
    revision: str
    commit_sha: str
    commit_url: str
    changed: bool
    files: tuple[str, ...]

    def __str__(self) -> str:
        return self.commit_url


#: Fields that define *which* adapter a repo branch holds; changing one needs ``allow_replace``.
IDENTITY_FIELDS = ("architecture", "base_model", "window_size", "down_factor", "weight_mode", "layers")


def push(directory: str | Path, repo_id: str, *, revision: str | None = None, private: bool = False,
         token: str | None = None, commit_message: str | None = None, matrix: str | Path | None = None,
         allow_replace: bool = False, allow_foreign_matrix: bool = False) -> PushResult:
    """Publish an adapter directory to the Hub: validate, render the card, upload in one commit.

    Args:
        directory: written by :func:`~clear_adapters.save_adapter` (``clear_config.json``, weights).
        repo_id: ``owner/name``; created if missing (``private`` applies only then).
        revision: target branch (default ``main``), created from ``main`` if missing.
        token: Hub token (default: ``HF_TOKEN`` / ``hf auth login``). Never logged or written.
        commit_message: default ``"Upload CLEAR adapter (window W, down factor D)"``.
        matrix: a ``clear-adapters matrix`` report (``matrix.md``, ``matrix.json`` or their folder)
            whose cases fill the card's compatibility section.
        allow_replace: allow replacing an adapter with a different base model or pattern on this
            branch (or adding one to a repo that holds other files). New weights for the *same*
            adapter never need it.
        allow_foreign_matrix: publish a matrix run on another pipeline than the adapter's base model
            (or a variant of it), e.g. the tiny test pipeline. Refused by default: its numbers would
            read as this adapter's. The card always says which pipeline, size and hardware produced them.

    Pushing an unchanged adapter creates no commit (``PushResult.changed`` is False). Returns a
    :class:`PushResult` whose ``commit_url`` points at the commit now holding the adapter.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

    from .hub import git_blob_sha1, translate_errors

    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id):
        raise InvalidArgumentError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    check_repo_id(repo_id)
    branch = revision or "main"
    check_revision(branch)
    if _REVISION_SHA.match(branch):
        raise InvalidArgumentError(f"revision must be a branch name to push to, not a commit sha, got {branch!r}")
    if commit_message is not None and not isinstance(commit_message, str):
        raise InvalidArgumentError(f"commit_message must be a string, got {type(commit_message).__name__}")
    directory = Path(directory)
    config, weights_path = check_adapter_dir(directory)
    if not config.get("base_model"):
        logger.warning("%s has no base_model: the card will not link a base model and its licence is 'other'; "
                       "save with save_adapter(..., base_model='owner/name') to fix", CONFIG_NAME)
    report = read_matrix_report(matrix) if matrix is not None else None
    foreign = matrix_is_foreign(report, config.get("base_model")) if report is not None else None
    if foreign and not allow_foreign_matrix:
        base = config.get("base_model") or "its base model"
        raise ClearAdapterError(f"refusing to put the compatibility matrix {matrix} on the card of an adapter for "
                                f"{base}: {foreign}, so its numbers would read as this adapter's. Run "
                                f"`clear-adapters matrix --pipeline {base} --adapter DIR`, or pass "
                                "allow_foreign_matrix=True (--allow-foreign-matrix): the card then says which "
                                "pipeline produced the numbers")
    card_text = render_card(config, repo_id=repo_id, revision=branch, matrix=report)
    card_bytes = card_text.encode("utf-8")
    config_data = (directory / CONFIG_NAME).read_bytes()
    _refuse_secrets({CONFIG_NAME: config_data, CARD_NAME: card_bytes,
                     weights_path.name: _safetensors_header(weights_path),
                     "the commit message": (commit_message or "").encode("utf-8", "surrogatepass")}, token)

    api = HfApi()
    with translate_errors(repo_id, revision=branch, action="push to", token=token):
        api.create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
        new_branch = False
        if branch != "main" and branch not in {b.name for b in api.list_repo_refs(repo_id, token=token).branches}:
            api.create_branch(repo_id, branch=branch, exist_ok=True, token=token)
            new_branch = True  # it starts as a copy of main: whatever adapter main holds is not this branch's
        info = api.model_info(repo_id, revision=branch, files_metadata=True, token=token)
        if private and not info.private:
            logger.warning("%s already exists and is public; its visibility was not changed", repo_id)
        remote = {s.rfilename: s for s in (info.siblings or [])}
        remote_config = _remote_config(repo_id, info.sha, token) if CONFIG_NAME in remote else None
        _check_replace(repo_id, branch, config, remote_config, sorted(remote), allow_replace or new_branch)

        local = {CONFIG_NAME: (git_blob_sha1(config_data), None), CARD_NAME: (git_blob_sha1(card_bytes), None),
                 weights_path.name: (None, config["sha256"])}
        changed_files = [name for name, (sha1, sha256) in local.items()
                         if not _same(remote.get(name), sha1, sha256, directory / name)]
        deletions = []
        old_weights = (remote_config or {}).get("weights")
        if old_weights and old_weights != config["weights"] and old_weights in remote:
            deletions.append(old_weights)  # the old weights would otherwise linger next to the new ones
        if not changed_files and not deletions:
            logger.info("%s@%s already holds this adapter (commit %s): nothing to push", repo_id, branch, info.sha)
            return PushResult(repo_id, branch, info.sha, _commit_url(api, repo_id, info.sha), False, ())
        try:
            ModelCard(card_text).validate(repo_type="model")  # the Hub's own YAML check, before committing
        except ValueError as exc:
            raise ClearAdapterError(f"the Hub rejected the card's metadata: {exc}") from None
        operations = [CommitOperationAdd(CONFIG_NAME, config_data),
                      CommitOperationAdd(weights_path.name, str(weights_path)),
                      CommitOperationAdd(CARD_NAME, card_bytes)]
        operations += [CommitOperationDelete(name) for name in deletions]
        message = commit_message or (f"Upload CLEAR adapter (window {config['window_size']}, down factor "
                                     f"{config.get('down_factor', 1)})")
        # parent_commit: if someone pushed since we compared, the Hub refuses (412) rather than us
        # replacing an adapter we never checked
        commit = api.create_commit(repo_id, operations, commit_message=message, revision=branch, token=token,
                                   parent_commit=info.sha)
    if commit.oid == info.sha:  # the client found nothing to change after all (and made no commit)
        return PushResult(repo_id, branch, info.sha, _commit_url(api, repo_id, info.sha), False, ())
    logger.info("pushed CLEAR adapter to %s@%s: %s", repo_id, branch, commit.commit_url)
    return PushResult(repo_id, branch, commit.oid, commit.commit_url, True, tuple(changed_files + deletions))


def _commit_url(api, repo_id: str, sha: str) -> str:
    return f"{api.endpoint}/{repo_id}/commit/{sha}"


def _same(sibling, git_sha1: str | None, sha256: str | None, local_path: Path) -> bool:
    """Whether a remote file (a ``RepoSibling`` with blob metadata) has the given content."""
    if sibling is None:
        return False
    lfs = getattr(sibling, "lfs", None)
    if lfs is not None:
        remote_sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        if sha256 is None:
            return False  # small files are sent as regular files; an LFS copy means it changed form
        return remote_sha == sha256
    if git_sha1 is None:  # a weights file the Hub stored as a regular git blob (tiny adapters)
        from .hub import git_file_sha1

        git_sha1 = git_file_sha1(local_path)
    return sibling.blob_id == git_sha1


def _remote_config(repo_id: str, commit: str, token) -> dict:
    """The ``clear_config.json`` at ``commit``; an unreadable one is returned as a marker dict."""
    from .artifact import read_config
    from .hub import download

    path = download(repo_id, CONFIG_NAME, revision=commit, token=token)  # with its cache-path checks
    try:
        return read_config(path)
    except ClearAdapterError as exc:
        return {"_unreadable": str(exc)}


def _check_replace(repo_id: str, branch: str, config: dict, remote_config: dict | None, remote_files: list[str],
                   allow_replace: bool) -> None:
    if allow_replace:
        return
    where = f"{repo_id}@{branch}"
    hint = ("push to another branch (revision=...) or repository, or pass allow_replace=True "
            "(--allow-replace) to replace it")
    if remote_config is None:
        others = [f for f in remote_files if f not in (".gitattributes",)]
        if others:
            raise ClearAdapterError(f"{where} already holds files ({', '.join(others[:4])}) but no CLEAR adapter; "
                                    f"{hint}")
        return
    if "_unreadable" in remote_config:
        raise ClearAdapterError(f"{where} holds a {CONFIG_NAME} this version cannot read "
                                f"({remote_config['_unreadable']}); {hint}")
    changes = []
    for key in IDENTITY_FIELDS:
        old, new = remote_config.get(key), config.get(key)
        if key == "architecture":
            old, new = old or "flux", new or "flux"
        if key == "down_factor":
            old, new = old or 1, new or 1
        if key == "weight_mode":
            old, new = old or "replace", new or "replace"
        if key == "layers" and (old is None or new is None):
            continue  # an older config without the list: nothing to compare
        if old != new:
            changes.append(f"{key} {_short(old)} -> {_short(new)}")
    if changes:
        raise ClearAdapterError(f"refusing to replace the adapter on {where}: it is a different adapter "
                                f"({'; '.join(changes)}); {hint}")


def _short(value) -> str:
    if isinstance(value, list):
        return f"[{len(value)} layers]"
    return repr(value)


def _safetensors_header(path: Path) -> bytes:
    with open(path, "rb") as fh:  # validated by check_adapter_dir: the length is within the cap
        (length,) = struct.unpack("<Q", fh.read(8))
        return fh.read(min(length, MAX_HEADER_BYTES))


def _refuse_secrets(blobs: dict[str, bytes], token) -> None:
    """Never publish a Hub token: it could only get there by mistake (e.g. pasted into provenance)."""
    from .hub import _known_tokens

    for secret in _known_tokens(token):
        for name, data in blobs.items():
            if secret.encode() in data:
                fix = "remove it" if name == "the commit message" else "remove it and re-save"
                raise ClearAdapterError(f"refusing to push: {name} contains a Hub token; {fix}")
