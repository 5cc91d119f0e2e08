"""The Triton shared-prefix attention kernel against its PyTorch reference: output and
dQ, dK, dV on fresh random inputs, with poisoned output buffers. On a CPU the kernel
runs in Triton's interpreter (small shapes, float32); the GPU tests (float16 and bfloat16,
head dims 64 and 128, grouped-query attention, the same varlen layouts) skip without
CUDA."""

from __future__ import annotations

import random

import pytest
import torch

triton = pytest.importorskip("triton")  # on CPU, conftest.py has switched on its interpreter

from grpo_lab.kernels import shared_prefix_attention as spa  # noqa: E402
from grpo_lab.kernels.layouts import RowLayout  # noqa
from grpo_lab.kernels.packed import packed_attention_reference  # noqa: E402

LAYOUTS = [
    [RowLayout(5, (3, 7, 1))],  # one row, prefix shorter than a tile
    [RowLayout(40, (17, 5)), RowLayout(3, (1, 1, 9, 2)), RowLayout(0, (6,))],  # varlen rows, a row without prefix
    [RowLayout(33, (33,))],  # G = 1
]
# tile shapes that differ per pass and from each other, so that whole tiles, masked
# tails and diagonals longer than one key (or query) step all occur
MIXED = spa.KernelConfig(spa.PassConfig(32, 16), spa.PassConfig(16, 32), spa.PassConfig(16, 32))
# relative Frobenius error against a float64 reference, by input dtype
GPU_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
GPU_LAYOUTS = LAYOUTS + [
    [RowLayout(700, (300, 128, 77, 512)), RowLayout(64, (1000,))],  # several whole tiles per range
    [RowLayout(1024, (256,) * 8)],  # a benchmark-like group
]


@pytest.fixture()
def poisoned(monkeypatch):
    """Every buffer the kernel allocates starts as NaN: an element it does not write fails."""
    monkeypatch.setattr(spa, "alloc", lambda like, shape=None, dtype=None: torch.full(
        shape if shape is not None else like.shape, float("nan"), device=like.device, dtype=dtype or like.dtype))


@pytest.fixture()
def fresh_seed():
    """Fresh random inputs on every run (the seed is in the failure message)."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


def run_both(layout, h, hkv, d, dtype, device, row_starts=None, total=None, ref_dtype=None, **kernel_kw):
    """(out, dq, dk, dv) of the reference (in ``ref_dtype`` on upcast inputs, default the
    same dtype) and of the kernel, on the same random inputs."""
    if total is None:
        total = sum(r.length for r in layout) if row_starts is None else row_starts[-1] + layout[-1].length
    q = torch.randn(total, h, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(total, hkv, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(total, hkv, d, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(total, h, d, device=device, dtype=dtype)
    results = []
    ref_softcap = kernel_kw.pop("ref_softcap", None)
    for fn, cast in ((spa.shared_prefix_attention_reference, ref_dtype), (spa.shared_prefix_attention, None)):
        inputs = [x.detach().to(cast).requires_grad_(True) for x in (q, k, v)] if cast else [q, k, v]
        kw = {"softcap": ref_softcap} if fn is spa.shared_prefix_attention_reference else kernel_kw
        out = fn(*inputs, layout, row_starts=row_starts, **kw)
        grads = torch.autograd.grad(out, inputs, dout.to(out.dtype))
        results.append((out.detach(), *grads))
    return results


def relative_error(ref, got):
    ref, got = ref.double(), got.double()
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("h, hkv", [(2, 2), (4, 2)])
def test_kernel_matches_reference_in_interpreter(layout, h, hkv, poisoned, fresh_seed):
    ref, ker = run_both(layout, h, hkv, 16, torch.float32, "cpu", block_m=16, block_n=16)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert not torch.isnan(b).any(), f"{name}: unwritten elements (seed {fresh_seed})"
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()), fresh_seed)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_pass_tile_shapes_in_interpreter(layout, poisoned, fresh_seed):
    """Each pass with its own tile shape (as the tuned configurations have) computes the same function."""
    ref, ker = run_both(layout, 4, 2, 16, torch.float32, "cpu", config=MIXED)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()), fresh_seed)


@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_soft_capped_logits_in_interpreter(softcap, poisoned, fresh_seed):
    """Gemma2's ``cap * tanh(scores / cap)`` in every pass, against the PyTorch reference."""
    ref, ker = run_both(LAYOUTS[1], 4, 2, 16, torch.float32, "cpu", config=MIXED, softcap=softcap, ref_softcap=softcap)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()), fresh_seed)
    x = 3 * torch.randn(sum(r.length for r in LAYOUTS[1]), 2, 16)  # large logits: the cap matters
    capped = spa.shared_prefix_attention_reference(x, x, x, LAYOUTS[1], softcap=softcap)
    assert not torch.allclose(capped, spa.shared_prefix_attention_reference(x, x, x, LAYOUTS[1]), atol=1e-3)


def test_padded_rows_in_interpreter(poisoned, fresh_seed):
    """Rows at ``row_starts`` with gaps between them (a padded ``[B, L]`` batch): the gaps get
    zero output and zero gradients, written by the kernel's wrapper (the buffers start as NaN)."""
    layout = [RowLayout(20, (7, 9)), RowLayout(5, (3,)), RowLayout(0, (4, 4))]
    row_starts = [0, 40, 80]
    ref, ker = run_both(layout, 4, 2, 16, torch.float32, "cpu", row_starts=row_starts, total=120, config=MIXED)
    gaps = torch.ones(120, dtype=torch.bool)
    for row, start in zip(layout, row_starts):
        gaps[start:start + row.length] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert not torch.isnan(b).any(), (name, fresh_seed)
        assert (b[gaps] == 0).all(), name
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (name, float((a - b).abs().max()), fresh_seed)


def test_reference_equals_the_packed_model_attention():
    """The kernel module's reference and the model-side reference are the same function."""
    layout = LAYOUTS[1]
    total = sum(r.length for r in layout)
    q, k, v = torch.randn(total, 4, 8), torch.randn(total, 2, 8), torch.randn(total, 2, 8)
    flat = spa.shared_prefix_attention_reference(q, k, v, layout)
    # the model-side reference takes padded rows [B, H, L, D]
    width = max(r.length for r in layout)
    starts = [0]
    for r in layout:
        starts.append(starts[-1] + r.length)
    def rows(x):
        return torch.stack([torch.nn.functional.pad(x[a:b], (0, 0, 0, 0, 0, width - (b - a))) for a, b in zip(starts, starts[1:])]).transpose(1, 2)
    packed = packed_attention_reference(rows(q), rows(k), rows(v), layout).transpose(1, 2)
    for i, (a, b) in enumerate(zip(starts, starts[1:])):
        assert torch.allclose(packed[i, : b - a], flat[a:b], atol=1e-6)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="multiple"):
        spa.shared_prefix_attention_reference(torch.randn(4, 3, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), [RowLayout(2, (2,))])
    with pytest.raises(ValueError, match="covers 9 tokens"):
        spa.shared_prefix_attention_reference(torch.randn(4, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8), [RowLayout(5, (4,))])
    x = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match="row 1 starts at token 3, inside the previous row"):
        spa.shared_prefix_attention(x, x, x, [RowLayout(2, (2,)), RowLayout(1, (1,))], row_starts=[0, 3])
    with pytest.raises(ValueError, match="ends at token 12"):
        spa.shared_prefix_attention(x, x, x, [RowLayout(2, (2,)), RowLayout(1, (1,))], row_starts=[0, 10])
    odd = torch.randn(4, 2, 80)  # the reference takes any head dim; the kernel says which it takes
    assert spa.shared_prefix_attention_reference(odd, odd, odd, [RowLayout(2, (2,))]).shape == (4, 2, 80)
    with pytest.raises(NotImplementedError, match="head dim 80.*trainer.attention=sdpa_shared_prefix"):
        spa.shared_prefix_attention(odd, odd, odd, [RowLayout(2, (2,))])


def test_tile_tables_put_the_heaviest_tiles_first():
    """Member tiles (which attend the whole prefix) launch before prefix tiles, and the
    table is cached: the same layout gives the same tensor object."""
    layout = (RowLayout(128, (64, 64)),)
    qb = spa._query_blocks(layout, (0,), 32, torch.device("cpu"))
    work = (qb[:, 3] - qb[:, 2]) + (qb[:, 1] - qb[:, 4])
    assert (work[:-1] >= work[1:]).all()
    assert int(qb[0, 0]) >= 128  # a member tile
    assert spa._query_blocks(layout, (0,), 32, torch.device("cpu")) is qb
    kb = spa._key_blocks(layout, (0,), 32, torch.device("cpu"))
    kwork = (kb[:, 2] - kb[:, 0]) + (kb[:, 4] - kb[:, 3])
    assert (kwork[:-1] >= kwork[1:]).all()
    assert int(kb[0, 0]) == 0  # the first prefix key tile is seen by every query of the row


def test_tuned_configs_cover_the_common_head_dims():
    for d in (64, 128):
        cfg = spa.config_for(d)
        for p in (cfg.fwd, cfg.dq, cfg.dkdv):
            assert p.block_m >= 16 and p.block_n >= 16 and p.num_warps in (1, 2, 4, 8, 16)
    assert spa.config_for(80) == spa.DEFAULT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("h, hkv", [(8, 2), (4, 4)])
@pytest.mark.parametrize("layout", GPU_LAYOUTS)
def test_kernel_on_gpu(layout, h, hkv, d, dtype, poisoned, fresh_seed):
    """The tuned configuration for the head dim, in 16-bit, against a float64 reference
    on the same (upcast) inputs: relative error under ``GPU_TOLERANCE``, every element written."""
    ref, ker = run_both(layout, h, hkv, d, dtype, "cuda", ref_dtype=torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert not torch.isnan(b).any(), (name, fresh_seed)
        rel = relative_error(a, b)
        assert rel < GPU_TOLERANCE[dtype], (name, rel, fresh_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_on_gpu_float32_is_exact_float32(poisoned, fresh_seed):
    """float32 inputs use float32 products (not tf32): float32 rounding only."""
    ref, ker = run_both(GPU_LAYOUTS[3], 8, 2, 64, torch.float32, "cuda", ref_dtype=torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert relative_error(a, b) < 1e-5, (name, relative_error(a, b), fresh_seed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_padded_rows_on_gpu(poisoned, fresh_seed):
    layout = [RowLayout(300, (70, 90, 129)), RowLayout(5, (300,))]
    ref, ker = run_both(layout, 8, 2, 128, torch.bfloat16, "cuda", row_starts=[0, 640], total=1280,
                        ref_dtype=torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ref, ker):
        assert not torch.isnan(b).any() and (b[589:640] == 0).all() and (b[945:] == 0).all(), name
        assert relative_error(a, b) < GPU_TOLERANCE[torch.bfloat16], (name, relative_error(a, b), fresh_seed)


def tiny_qwen2(head_dim: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim)
    return AutoModelForCausalLM.from_config(config)


def model_logprobs_and_grads(model, prompts, responses, mode):
    from grpo_lab.training.forward import response_logprobs
    from grpo_lab.training.shared_prefix import shared_prefix_logprobs

    model.zero_grad(set_to_none=True)
    if mode == "plain":
        lp, mask, _ = response_logprobs(model, prompts, responses)
    else:
        lp, mask, _ = shared_prefix_logprobs(model, prompts, responses, attention=mode)
    (lp * mask).sum().backward()
    return lp.detach().double(), torch.cat([p.grad.flatten() for p in model.parameters()]).double()


def test_model_forward_through_the_kernel_equals_the_ordinary_forward():
    """trainer.attention=triton_shared_prefix's path: the kernel inside a Qwen2 forward,
    with two groups of different lengths (padded rows in the batch) and a group of one."""
    from grpo_lab.training.shared_prefix import enable_shared_prefix

    model = enable_shared_prefix(tiny_qwen2(16))
    prefix = torch.randint(0, 50, (21,))
    other = torch.randint(0, 50, (9,))
    prompts = [prefix, prefix, prefix, other, other, torch.randint(0, 50, (5,))]  # groups of 3, 2 and 1
    responses = [torch.randint(0, 50, (n,)) for n in (4, 2, 5, 3, 6, 2)]
    plain = model_logprobs_and_grads(model, prompts, responses, "plain")
    triton_ = model_logprobs_and_grads(model, prompts, responses, "triton")
    assert torch.allclose(plain[0], triton_[0], atol=1e-4)
    assert torch.allclose(plain[1], triton_[1], atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim", [64, 128])
def test_model_forward_through_the_kernel_on_gpu_in_bf16(head_dim, fresh_seed):
    """In bf16 on the GPU, the kernel path is as close to the float32 ordinary forward as the
    PyTorch shared-prefix path in bf16 is (within a factor of 2 and a small floor)."""
    from grpo_lab.training.shared_prefix import enable_shared_prefix

    model = enable_shared_prefix(tiny_qwen2(head_dim)).cuda()
    prefix = torch.randint(0, 50, (300,))
    prompts = [prefix] * 4 + [prefix[:100]] * 2
    responses = [torch.randint(0, 50, (n,)) for n in (40, 17, 64, 1, 33, 80)]
    exact = model_logprobs_and_grads(model, prompts, responses, "plain")
    model.to(torch.bfloat16)
    ref = model_logprobs_and_grads(model, prompts, responses, "reference")
    ker = model_logprobs_and_grads(model, prompts, responses, "triton")
    for i, name in enumerate(("logprobs", "grads")):
        err_ref, err_ker = relative_error(exact[i], ref[i]), relative_error(exact[i], ker[i])
        assert err_ker < 2 * err_ref + 1e-3, (name, err_ker, err_ref, fresh_seed)


def test_missing_cuda_is_a_clear_error(monkeypatch, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    from grpo_lab.config import Config, ConfigError, TrainerConfig
    from grpo_lab.training.shared_prefix import check_attention_backend
    from grpo_lab.trainer import Trainer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA"):
        check_attention_backend("triton")
    with pytest.raises(ConfigError, match="trainer.attention='triton_shared_prefix'.*CUDA"):
        Trainer(Config(trainer=TrainerConfig(attention="triton_shared_prefix")), output_dir=tmp_path)


@pytest.mark.slow
def test_benchmark_scripts_run_their_code_paths_on_cpu(tmp_path):
    """The GPU benchmark's comparison (both layouts, each implementation checked against the
    reference, FlexAttention's mask included) and tuning paths (in the interpreter, tiny
    shapes), and the training-step benchmark with its tuned-configuration override, run
    end to end."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    tiny = ["--dtype", "float32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"]
    runs = [
        ["benchmarks/kernel.py", "--device", "cpu", "--layout", "shared-prefix", "trie", "--groups", "2", "--prefix", "64",
         "--member", "32", "--episodes", "2", "--turns", "2", "--trie-prompt", "40", "--answer", "8", "--observation", "5",
         "--json", str(tmp_path / "k.json"), *tiny],
        ["benchmarks/kernel.py", "--device", "cpu", "--tune", "--workers", "1", "--tune-json", str(tmp_path / "t.json"), *tiny],
        ["benchmarks/shared_prefix.py", "--groups", "2", "--ratios", "1", "--repeats", "1",
         "--tuned-json", str(tmp_path / "t.json")],
    ]
    for args in runs:
        proc = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert [r.get("workload") for r in rows] == [None, "conversation", "tree"] and rows[0]["G"] == 2
    assert all(r["tokens_packed"] < r["tokens_rows"] for r in rows)
    assert "16" in json.loads((tmp_path / "t.json").read_text())


BARE_MACHINE = """
import sys
# as on a GPU machine with only torch, triton, transformers and pytest: the project is not
# installed (PYTHONPATH is the checkout) and none of its other dependencies are there
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
ABSENT = {"hydra", "omegaconf", "datasets", "bm25s", "math_verify", "vllm", "textworld", "alfworld", "bs4", "peft"}

class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Absent())
"""


def test_the_gpu_path_runs_from_a_bare_checkout(tmp_path):
    """The kernels, the packed forwards, the rollout the GPU tests drive and the GPU
    benchmarks import from the source tree alone (``PYTHONPATH=.``, nothing installed)
    without the packages a GPU image may lack; ``grpo_lab.kernels`` comes from the checkout."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "sitecustomize.py").write_text(BARE_MACHINE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    code = ("import grpo_lab.kernels.trie_attention as t, grpo_lab.kernels.shared_prefix_attention, grpo_lab.training.trie, "
            "grpo_lab.training.shared_prefix, grpo_lab.training.forward, grpo_lab.rollout, grpo_lab.envs.frozenlake, "
            "grpo_lab.modeling; print(t.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == os.path.join(root, "grpo_lab", "kernels", "trie_attention.py")
    for script in ("benchmarks/kernel.py", "benchmarks/shared_prefix.py", "benchmarks/trie.py"):
        proc = subprocess.run([sys.executable, script, "--help"], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (script, proc.stderr[-3000:])


def test_the_gpu_session_script_names_real_options_and_files(monkeypatch):
    """Every benchmark command of ``benchmarks/gpu_session.sh`` parses with its script's
    own argument parser, and every test file it runs exists: a typo would otherwise first
    show on a lent GPU."""
    import importlib
    import os
    import re
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "benchmarks", "gpu_session.sh")).read().replace("\\\n", " ")
    monkeypatch.syspath_prepend(os.path.join(root, "benchmarks"))
    commands = re.findall(r"\$py (benchmarks/\w+\.py[^\n]*)", text)
    assert len(commands) == 8, commands
    for line in commands:
        script, *argv = shlex.split(line.replace("${KERNEL_ARGS:-}", "").replace("$out", "out"))
        module = importlib.import_module(os.path.basename(script)[:-3])
        module.parse_args(argv)  # argparse exits on an unknown option or a bad value
    tests = re.findall(r"tests/\w+\.py", text)
    assert tests and all(os.path.isfile(os.path.join(root, t)) for t in tests)
    phases = re.findall(r"^(\w+)\)$", text, flags=re.M)
    assert phases == ["check", "tune", "kernel", "step", "agents", "async"]
    assert all(f"bash benchmarks/gpu_session.sh {p} " in text for p in phases)  # its usage lines
