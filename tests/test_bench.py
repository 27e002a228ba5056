"""The benchmark runs in --quick mode and writes the documented JSON (no timing assertions)."""
import json

import pytest

from helpers import run_script


@pytest.mark.slow
def test_quick_bench_writes_its_json_schema(tmp_path):
    out = run_script("-m", "nanococa.bench", "--quick", "--device=cpu", f"--out={tmp_path / 'b.json'}",
                     timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.load(open(tmp_path / "b.json"))
    assert set(res) == {"meta", "attention", "train", "generate", "copy_bandwidth_bytes_per_s"}
    paths = {r["path"] for r in res["attention"]}
    methods = ("rope", "coca", "slack", "alibi")
    assert paths == {f"{v}-{impl}" for v in methods for impl in ("fast", "naive")} | {"official-einsum"}
    for r in res["attention"]:
        assert {"path", "N", "status"} <= set(r)
        if r["status"] == "ok":
            assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and "fwdbwd_ratio" in r
    fast = [r for r in res["attention"] if r["path"].endswith("-fast")]
    assert fast and all(r["status"] == "ok" for r in fast)  # the fast paths always run
    assert all(r["status"] == "ok" for r in res["attention"] if r["path"] == "official-einsum")
    assert {r["attention"] for r in res["train"]} == {"rope", "coca", "coca-slack", "alibi"}
    assert all(r["tokens_per_s"] > 0 and "tokens_per_s_ratio" in r for r in res["train"])
    for r in res["generate"]:
        assert {"prefill_s", "decode_tokens_per_s", "bound_tokens_per_s", "fraction_of_bound",
                "decode_ratio"} <= set(r)
    assert "| path | N |" in out.stdout
    assert "--quick sets lengths=128,256,512, heads=4" in out.stdout
