"""Pallas kernels (GDN and SSD, forward and backward) against the `chunked` path, on CPU.

Both drivers run here: "gpu" (the Triton-backend kernel, generic Pallas interpreter) and "tpu" (the Mosaic
TPU kernel in TPU interpret mode, with race detection and out-of-bounds reads raising). Tolerance: fp32
inputs, max |a - b| / max |b| <= 1e-5 for outputs, final states and every input cotangent.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from hylo_jax.config import MeshConfig
from hylo_jax.kernels import pallas_common, pallas_gdn, pallas_ssd
from hylo_jax.kernels.gated_delta import chunk_state_recurrence, gated_delta_rule, make_recurrence
from hylo_jax.kernels.ssd import ssd
from hylo_jax.sharding import make_mesh

TOL = 1e-5


def interpret_for(driver):
    if driver == "tpu":
        return pltpu.InterpretParams(detect_races=True, out_of_bounds_reads="raise")
    return True


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def segments(rng, b, t, p=0.08):
    return jnp.asarray(np.cumsum(rng.random((b, t)) < p, axis=1), jnp.int32)


# ----------------------------------------------------------------------------- GDN
def gdn_inputs(seed, b, t, h, dk, dv, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    args = dict(q=r(b, t, h, dk), k=r(b, t, h, dk), v=r(b, t, h, dv),
                g=-np.logaddexp(0.0, r(b, t, h) - 1.0), beta=1 / (1 + np.exp(-r(b, t, h))),
                initial_state=r(b, h, dk, dv))
    args = {k: jnp.asarray(v, dtype if k in "qkv" else jnp.float32) for k, v in args.items()}
    return args, segments(rng, b, t), rng


def gdn_fn(impl, seg, l2, chunk=16):
    def f(q, k, v, g, beta, initial_state):
        return gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, segment_ids=seg,
                                use_qk_l2norm=l2, chunk_size=chunk, impl=impl)
    return f


def compare(f_ref, f_new, args, rng, tol=TOL):
    (o1, s1), vjp1 = jax.vjp(f_ref, *args)
    (o2, s2), vjp2 = jax.vjp(f_new, *args)
    errs = {"out": rel_err(o2, o1), "state": rel_err(s2, s1)}
    do = jnp.asarray(rng.standard_normal(o1.shape), o1.dtype)
    ds = jnp.asarray(rng.standard_normal(s1.shape), jnp.float32)
    for i, (a, b) in enumerate(zip(vjp2((do, ds)), vjp1((do, ds)))):
        errs[f"d{i}"] = rel_err(a, b)
    assert max(errs.values()) <= tol, errs
    return errs


# (b, t, h, dk, dv, chunk, segmented, l2)
GDN_CASES = [
    pytest.param(2, 37, 2, 16, 32, 16, True, True, id="odd-packed-l2"),
    pytest.param(1, 64, 1, 32, 16, 32, False, False, marks=pytest.mark.slow, id="divisible"),
    pytest.param(1, 5, 2, 8, 8, 16, False, True, marks=pytest.mark.slow, id="shorter-than-chunk"),
]


@pytest.mark.parametrize("driver", ["gpu", "tpu"])
@pytest.mark.parametrize("b,t,h,dk,dv,chunk,segmented,l2", GDN_CASES)
def test_gdn_pallas_matches_chunked(driver, b, t, h, dk, dv, chunk, segmented, l2):
    args, seg, rng = gdn_inputs(1, b, t, h, dk, dv)
    seg = seg if segmented else None
    with pallas_common.force_backend(driver, interpret_for(driver)):
        compare(gdn_fn("chunked", seg, l2, chunk), gdn_fn("pallas", seg, l2, chunk), list(args.values()), rng)


@pytest.mark.parametrize("driver", ["gpu", pytest.param("tpu", marks=pytest.mark.slow)])
def test_gdn_recurrence_kernels_in_value_blocks(driver):
    """The recurrence kernels alone, dv = 24 in 3 blocks of 8, against the `lax.scan` recurrence."""
    n, b, h, c, dk, dv = 3, 2, 2, 8, 16, 24
    rng = np.random.default_rng(2)
    args = [jnp.asarray(rng.standard_normal(shape) * 0.5, jnp.float32)
            for shape in [(b, h, n, c, dv), (b, h, n, c, dk), (b, h, n, c, dk)]]
    args += [jnp.asarray(rng.uniform(0.2, 1.0, (b, h, n)), jnp.float32),
             jnp.asarray(rng.standard_normal((b, h, dk, dv)), jnp.float32)]
    kernels = make_recurrence(*pallas_gdn.scans(driver, interpret_for(driver), jnp.float32, vb=8))

    def pair(fn):
        def run(*a):
            states, deltas, final = fn(*a)
            return jnp.concatenate([states.ravel(), deltas.ravel()]), final
        return run

    compare(pair(chunk_state_recurrence), pair(kernels), args, rng)


# ----------------------------------------------------------------------------- SSD
def ssd_inputs(seed, b, t, h, p, g, n, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    dt0 = np.exp(rng.uniform(np.log(3e-3), np.log(0.3), h))
    args = dict(x=r(b, t, h, p), dt=0.5 * r(b, t, h), A=-np.exp(rng.uniform(np.log(0.5), np.log(4.0), h)),
                B=r(b, t, g, n), C=r(b, t, g, n), D=r(h), dt_bias=dt0 + np.log(-np.expm1(-dt0)),
                initial_state=r(b, h, p, n))
    args = {k: jnp.asarray(v, dtype if k in ("x", "B", "C") else jnp.float32) for k, v in args.items()}
    return args, segments(rng, b, t), rng


def ssd_fn(impl, seg, chunk):
    def f(x, dt, A, B, C, D, dt_bias, initial_state):
        return ssd(x, dt, A, B, C, D=D, dt_bias=dt_bias, initial_state=initial_state, segment_ids=seg,
                   chunk_size=chunk, impl=impl)
    return f


# (b, t, h, p, g, n, chunk, segmented)
SSD_CASES = [
    pytest.param(2, 37, 4, 16, 2, 8, 16, True, id="odd-packed-groups"),
    pytest.param(1, 48, 2, 8, 1, 16, 16, False, marks=pytest.mark.slow, id="divisible-g1"),
    pytest.param(1, 7, 2, 8, 2, 8, 8, True, marks=pytest.mark.slow, id="short"),
]


@pytest.mark.parametrize("driver", [pytest.param("gpu", marks=pytest.mark.slow), "tpu"])  # (gpu: ~30 s on CI)
@pytest.mark.parametrize("b,t,h,p,g,n,chunk,segmented", SSD_CASES)
def test_ssd_pallas_matches_chunked(driver, b, t, h, p, g, n, chunk, segmented):
    args, seg, rng = ssd_inputs(3, b, t, h, p, g, n)
    seg = seg if segmented else None
    with pallas_common.force_backend(driver, interpret_for(driver)):
        compare(ssd_fn("chunked", seg, chunk), ssd_fn("pallas", seg, chunk), list(args.values()), rng)


# ----------------------------------------------------------------------------- composition and dispatch
def test_jit_grad_checkpoint_compose():
    """jax.jit(jax.grad(jax.checkpoint(...))) through both kernels matches the chunked path."""
    gargs, gseg, _ = gdn_inputs(4, 1, 20, 1, 16, 16)
    sargs, sseg, _ = ssd_inputs(5, 1, 20, 2, 8, 1, 8)

    def loss(impl):
        def f(ga, sa):
            o, s = jax.checkpoint(lambda a: gated_delta_rule(*a[:5], initial_state=a[5], segment_ids=gseg,
                                                             chunk_size=16, impl=impl))(ga)
            y, h = jax.checkpoint(lambda a: ssd(*a[:5], D=a[5], dt_bias=a[6], initial_state=a[7],
                                                segment_ids=sseg, chunk_size=8, impl=impl))(sa)
            return jnp.sum(o * o) + jnp.sum(s) + jnp.sum(y * y) + jnp.sum(h)
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    ref = loss("chunked")(list(gargs.values()), list(sargs.values()))
    new = loss("pallas")(list(gargs.values()), list(sargs.values()))
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
        assert rel_err(a, b) <= TOL


def test_shard_map_over_batch_and_heads():
    """shard_map over batch and heads. check_vma=False: JAX's generic Pallas interpreter (CPU) fails its own
    varying-axes check inside shard_map (dynamic_slice in hlo_interpreter); compiled kernels get output
    shapes with the inputs' varying axes (`pallas_common._with_vma`)."""
    mesh = jax.make_mesh((2, 2), ("data", "tensor"))
    args, seg, _ = gdn_inputs(6, 2, 20, 2, 8, 8)

    def f(impl):
        def body(q, k, v, g, beta, s0, seg):
            return gated_delta_rule(q, k, v, g, beta, initial_state=s0, segment_ids=seg, chunk_size=8, impl=impl)
        bt = P("data", None, "tensor")
        specs = (bt, bt, bt, bt, bt, P("data", "tensor"), P("data"))
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=(bt, P("data", "tensor")),
                                     check_vma=False))

    bt, st = P("data", None, "tensor"), P("data", "tensor")
    specs = [bt] * 5 + [st, P("data")]
    placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, sp)) for a, sp in zip([*args.values(), seg], specs)]
    ref = f("chunked")(*placed)
    new = f("pallas")(*placed)
    assert rel_err(new[0], ref[0]) <= TOL and rel_err(new[1], ref[1]) <= TOL


@pytest.mark.slow  # ~70 s a case on the CI machine
@pytest.mark.parametrize("op", ["gdn", "ssd"])
def test_pallas_under_a_set_mesh_runs_per_device(op):
    """Global arrays under `jax.set_mesh` (batch over data x fsdp, heads over tensor): the Pallas kernels
    run in a shard_map (not gathered and replicated by the partitioner); values and gradients = chunked."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    if op == "gdn":
        args, seg, rng = gdn_inputs(11, 4, 20, 2, 8, 8)
        fn = lambda impl: gdn_fn(impl, seg, True, 8)  # noqa: E731
    else:
        args, seg, rng = ssd_inputs(12, 4, 20, 4, 8, 2, 8)
        fn = lambda impl: ssd_fn(impl, seg, 8)  # noqa: E731
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(a, jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), *[None] * (a.ndim - 1))
                                                                if a.shape[0] == 4 else P()))
                   for a in args.values()]
        assert "shard_map" in str(jax.make_jaxpr(fn("pallas"))(*sharded))
        compare(fn("chunked"), fn("pallas"), sharded, rng)


@pytest.mark.slow
def test_bf16_inputs_close_to_chunked():
    """bf16 q/k/v and x/B/C: the kernels multiply bf16 operands (fp32 accumulation); bf16-level agreement."""
    args, seg, _ = gdn_inputs(7, 1, 24, 1, 16, 16, dtype=jnp.bfloat16)
    o1, s1 = gdn_fn("chunked", seg, True)(*args.values())
    o2, s2 = gdn_fn("pallas", seg, True)(*args.values())
    assert o2.dtype == jnp.bfloat16 and s2.dtype == jnp.float32
    assert rel_err(o2, o1) < 3e-2 and rel_err(s2, s1) < 3e-2
    sargs, sseg, _ = ssd_inputs(8, 1, 24, 2, 8, 1, 8, dtype=jnp.bfloat16)
    y1, h1 = ssd_fn("chunked", sseg, 8)(*sargs.values())
    y2, h2 = ssd_fn("pallas", sseg, 8)(*sargs.values())
    assert rel_err(y2, y1) < 3e-2 and rel_err(h2, h1) < 3e-2


def test_auto_is_chunked_on_cpu_and_falls_back_with_one_log(monkeypatch, caplog):
    args, seg, _ = gdn_inputs(9, 1, 6, 1, 8, 8)
    ref = gdn_fn("chunked", seg, False)(*args.values())
    np.testing.assert_array_equal(gdn_fn("auto", seg, False)(*args.values())[0], ref[0])
    # Pretend to be on a TPU with a chunk the TPU tiling rejects: "auto" logs the reason once and runs chunked.
    monkeypatch.setattr(pallas_common, "platform", lambda: "tpu")
    pallas_common._log_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="hylo_jax.kernels"):
        for _ in range(2):
            o, _ = gated_delta_rule(*list(args.values())[:5], chunk_size=4, impl="auto")
    msgs = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(msgs) == 1 and "chunk_size=4" in msgs[0]
    assert pallas_common.choose("ssd", "auto", lambda be: None)[:2] == ("pallas", "tpu")


@pytest.mark.slow  # ~45 s a case on the CI machine
@pytest.mark.parametrize("cores, kernel_under_grad", [(132, False), (2, True)])
def test_ssd_auto_on_gpu_runs_the_kernel_forward_unless_the_batch_fills_the_gpu(monkeypatch, cores,
                                                                                  kernel_under_grad):
    """On GPU, ssd(impl="auto") runs the Pallas forward where nothing differentiates (inference) and, under
    jax.grad, the chunked path's forward and VJP (the kernel's fwd+bwd is the slower one at B = 1), unless
    batch x heads fills 3/4 of the SMs: then the kernels' forward and backward (2 heads here, 2 "SMs")."""
    args, seg, rng = ssd_inputs(13, 1, 24, 2, 16, 1, 16)
    kernel, calls = pallas_ssd.ssd_pallas, []

    def interpreted(*a, chunk_size, backend, interpret):
        calls.append(backend)
        return kernel(*a, chunk_size=chunk_size, backend=backend, interpret=True)

    with pallas_common.force_backend("gpu", True):
        y_pallas, h_pallas = ssd_fn("pallas", seg, 16)(*args.values())
    monkeypatch.setattr(pallas_common, "platform", lambda: "gpu")
    monkeypatch.setattr(pallas_common, "gpu_capability_ok", lambda driver="gpu": (True, ""))
    monkeypatch.setattr(pallas_common, "gpu_cores", lambda: cores)
    monkeypatch.setattr(pallas_ssd, "ssd_pallas", interpreted)
    y_auto, h_auto = jax.jit(ssd_fn("auto", seg, 16))(*args.values())
    assert calls == ["gpu"]
    assert rel_err(y_auto, y_pallas) <= 1e-6 and rel_err(h_auto, h_pallas) <= 1e-6  # jit vs eager rounding
    compare(ssd_fn("chunked", seg, 16), ssd_fn("auto", seg, 16), list(args.values()), rng,
            tol=TOL if kernel_under_grad else 1e-6)
    assert len(calls) == (2 if kernel_under_grad else 1)


def test_unknown_impl_raises():
    args, _, _ = gdn_inputs(10, 1, 4, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown impl"):
        gated_delta_rule(*list(args.values())[:5], impl="triton")
    sargs, _, _ = ssd_inputs(11, 1, 4, 2, 8, 1, 8)
    with pytest.raises(ValueError, match="unknown impl"):
        ssd(*list(sargs.values())[:5], impl="mosaic")


def test_model_configs_accept_new_impls():
    from hylo_jax.models.gated_deltanet import GDNConfig
    from hylo_jax.models.mamba2 import Mamba2Config

    assert GDNConfig(hidden_size=64).impl == "auto"
    assert Mamba2Config(hidden_size=64).impl == "auto"
    GDNConfig(hidden_size=64, impl="pallas")


def test_gpu_value_block_halves_until_half_the_sms_get_programs(monkeypatch):
    monkeypatch.setattr(pallas_common, "gpu_cores", lambda: 132)
    assert pallas_gdn.default_vb("gpu", 512, rows=6) == 32  # batch 1 x 6 heads: 96 programs >= 66
    assert pallas_gdn.default_vb("gpu", 128, rows=4) == 16  # 4 x 4 programs < 66: halved (to 4 x 8)
    assert pallas_gdn.default_vb("gpu", 512, rows=64) == 32
    assert pallas_gdn.default_vb("gpu", 48, rows=1) == 48  # no power-of-two halving below a non-pow2 width
    assert pallas_gdn.default_vb("tpu", 512, rows=1) == 128


def test_gpu_pipeline_stages_fit_in_shared_memory():
    # What the H200 compiler accepted (benchmarks/scan_launch.py): vb 32 with 3 stages, vb 64 with 2.
    assert pallas_gdn.gpu_launch(64, 256, 32, jnp.bfloat16)["num_stages"] == 3
    assert pallas_gdn.gpu_launch(64, 256, 64, jnp.bfloat16)["num_stages"] == 2
    assert pallas_gdn.gpu_launch(128, 256, 32, jnp.bfloat16)["num_stages"] == 1  # never below one
    assert pallas_common.fit_stages(1) == 3  # at most three
    # fp32 operands count twice per stage (H200: 3 stages of the fp32 SSD at d_state 128 did not fit)
    assert pallas_common.fit_stages(2 * 64 * 128 * 4, 128 * 64 * 4, itemsize=4) == 1
