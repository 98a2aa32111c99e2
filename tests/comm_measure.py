"""Measure what torch.distributed sent inside CLEAR's sequence-parallel attention calls (test helper).

Runs a function under torch's profiler, reads the ``c10d::*`` operations (with their tensor sizes)
that fall inside the ``clear_adapters.sequence_parallel_attention`` ranges the strategies open, and
converts them to bytes sent by this rank with the same conventions the library counts with (see
``integrations/_parallel.py``). Tensor lists carry no dtype in the trace: the runs measured here are
float32, hence 4 bytes per element.
"""

from __future__ import annotations

import json
import os
import tempfile

from torch.profiler import ProfilerActivity, profile

RANGE = "clear_adapters.sequence_parallel_attention"


def _numel(dims) -> int:
    if not dims:
        return 0
    if isinstance(dims[0], list):  # a tensor list: its tensors
        return sum(_numel(d) for d in dims)
    n = 1
    for d in dims:
        n *= d
    return n


def sent_elements(name: str, dims: list, ranks: int) -> float:
    """Elements this rank puts on the wire for one c10d op (ring algorithms for collectives)."""
    if name == "c10d::alltoall_base_":
        return _numel(dims[0]) * (ranks - 1) / ranks
    if name in ("c10d::allgather_into_tensor_coalesced_", "c10d::_allgather_base_", "c10d::allgather_"):
        return _numel(dims[1]) * (ranks - 1)
    if name == "c10d::allreduce_":
        return 2 * _numel(dims[0]) * (ranks - 1) / ranks
    if name == "c10d::send":
        return _numel(dims[0])
    if name in ("c10d::recv_", "c10d::barrier", "c10d::recv_any_source_"):
        return 0
    raise ValueError(f"no byte rule for {name} (dims {dims})")


def measure_attention_bytes(fn, ranks: int, element_size: int = 4) -> dict:
    """Run ``fn``; return {calls, bytes_per_call, ops} for the attention ranges it opened."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    ranges = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == RANGE and "dur" in e]
    total, ops = 0.0, {}
    for e in events:
        name = e.get("name", "")
        if not name.startswith("c10d::") or "dur" not in e:
            continue
        if not any(a <= e["ts"] and e["ts"] + e["dur"] <= b for a, b in ranges):
            continue
        sent = sent_elements(name, e.get("args", {}).get("Input Dims", []), ranks) * element_size
        total += sent
        ops[name] = ops.get(name, 0) + sent
    calls = len(ranges)
    return {"calls": calls, "bytes_per_call": total / calls if calls else 0.0, "ops": ops}
