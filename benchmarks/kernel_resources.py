"""Registers and spills of every Mosaic GPU kernel, compiled for sm_90a (Hopper) on a machine without a GPU.

    python benchmarks/kernel_resources.py --plugin jax_cuda12_pjrt-<jax version>-...whl [--ops ssd,gdn]

A thread of a warpgroup holds a [64, 128] fp32 tile in 64 registers and has at most 255; ptxas spills the rest
to local memory, which a chunk loop then reads back every step. ptxas reports it (-v) and runs on any machine,
but the Mosaic GPU pipeline from MLIR to PTX lives in jax's CUDA PJRT plugin, behind `MosaicGpuCompile`, which
asks the driver for the device's compute capability first and loads the compiled module last. So this script
1. lowers the ops for CUDA (pure Python, as the tests do) and takes each Mosaic kernel's module out of its
   custom call;
2. compiles each in a child process whose libcuda is `sm90/fake_libcuda.c` (one device of compute capability
   9.0; loading a module is refused, so the child stops right after ptxas), with MOSAIC_GPU_DUMP_PTXAS=1;
3. registers the plugin's LLVM targets first, as its GPU client does when it starts: their initialisers are
   local symbols of the plugin, called at their offsets from `nm`.
One table: each kernel's entry point (named in `mosaic_common.gpu_kernel`), registers a thread, spilled bytes
stored / loaded, stack frame. `--dump-ptx DIR` also keeps each kernel's PTX; its SASS, to see where spills and
waits sit in the chunk loop: `ptxas -arch=sm_90a DIR/gdn_forward_0.ptx -o f.cubin && nvdisasm -c f.cubin`
(nvdisasm: `pip download --no-deps nvidia-cuda-nvdisasm`, in nvidia/cu13/bin; benchmarks/NOTES.md, session 21).
(Shared memory is dynamic, so ptxas does not see it: the kernels size it themselves, `mosaic_common.fit`.)

Needs the jax-cuda12-pjrt wheel of the installed jax (`pip download --no-deps jax-cuda12-pjrt==<jax version>`;
--plugin takes the wheel or the .so in it), a C compiler, `nm` (binutils) and ptxas (--cuda-root, default
/usr/local/cuda). A ptxas of another CUDA release than the device's may allocate registers a little
differently; MOSAIC_GPU_DUMP_PTXAS=1 on the device gives its own numbers.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

FAKE_DRIVER = pathlib.Path(__file__).parent / "sm90" / "fake_libcuda.c"
PLUGIN_IN_WHEEL = "jax_plugins/xla_cuda12/xla_cuda_plugin.so"
TARGETS = ("NVPTX", "X86")  # the device's and the host's (the kernel's launch code is compiled for the host)
TARGET_PARTS = ("TargetInfo", "Target", "TargetMC", "AsmPrinter")


# ---------------------------------------------------------------------------------------------- the child
def compile_module(plugin: str, module_path: str) -> None:
    """In the child: register the plugin's LLVM targets, then compile one kernel module (ptxas -v to stderr)."""
    offsets = _symbol_offsets(plugin)
    dll = ctypes.CDLL(plugin)
    base = ctypes.cast(dll.MosaicGpuCompile, ctypes.c_void_p).value - offsets["MosaicGpuCompile"]
    for target in TARGETS:
        for part in TARGET_PARTS:
            ctypes.CFUNCTYPE(None)(base + offsets[f"LLVMInitialize{target}{part}"])()
    compile_fn = dll.MosaicGpuCompile
    compile_fn.argtypes, compile_fn.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    module = pathlib.Path(module_path).read_bytes()
    compile_fn(module, len(module))  # aborts when the stand-in driver refuses to load the module


def _symbol_offsets(plugin: str) -> dict[str, int]:
    wanted = {"MosaicGpuCompile"} | {f"LLVMInitialize{t}{p}" for t in TARGETS for p in TARGET_PARTS}
    table = subprocess.run(["nm", plugin], capture_output=True, text=True, check=True).stdout
    found = {}
    for fields in map(str.split, table.splitlines()):  # address, kind, name
        if len(fields) == 3 and fields[2] in wanted:
            found[fields[2]] = int(fields[0], 16)
    if missing := wanted - found.keys():
        raise SystemExit(f"{plugin} has no symbols {sorted(missing)}: not a jax CUDA PJRT plugin?")
    return found


# ---------------------------------------------------------------------------------------------- the parent
REPORT = {
    "kernel": re.compile(r"Compiling entry function '(\w+?)(?:_mosaic_gpu_kernel)?' for"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}


def resources(plugin: str, module: bytes, driver_dir: str, cuda_root: str, dump: str | None = None) -> dict[str, str]:
    """ptxas's report on one module, compiled in a child process (which writes the module's PTX into `dump`)."""
    with tempfile.NamedTemporaryFile(suffix=".mlirbc") as f:
        f.write(module)
        f.flush()
        env = dict(os.environ, LD_LIBRARY_PATH=driver_dir, MOSAIC_GPU_DUMP_PTXAS="1", MOSAIC_GPU_CUDA_ROOT=cuda_root)
        if dump:  # (the report then goes to a file there, <kernel>_0.ptxas)
            env.update(MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_TO=dump)
            before = {p: p.stat().st_mtime for p in pathlib.Path(dump).glob("*.ptxas")}
        child = subprocess.run([sys.executable, __file__, "--compile-one", f.name, "--plugin", plugin],
                               capture_output=True, text=True, env=env)
    log = child.stdout + child.stderr
    if dump:
        log += "".join(p.read_text() for p in pathlib.Path(dump).glob("*.ptxas") if before.get(p) != p.stat().st_mtime)
    found = {key: m.group(1) for key, pattern in REPORT.items() if (m := pattern.search(log))}
    if "registers" not in found:
        tail = "\n".join(log.strip().splitlines()[-5:])
        raise SystemExit(f"ptxas gave no report (is ptxas under {cuda_root}/bin?):\n{tail}")
    return found


def build_driver(directory: str) -> str:
    subprocess.run(["cc", "-shared", "-fPIC", "-o", f"{directory}/libcuda.so.1", str(FAKE_DRIVER), "-ldl"],
                   check=True)
    return directory


def plugin_library(path: str, directory: str) -> str:
    """The plugin's .so: `path` itself, or unpacked from the wheel at `path`."""
    if not path.endswith(".whl"):
        return path
    with zipfile.ZipFile(path) as wheel:
        return wheel.extract(PLUGIN_IN_WHEEL, directory)


def mosaic_modules(fn, *args) -> list[bytes]:
    """The serialized module of every Mosaic GPU kernel in fn's lowering for CUDA, in program order."""
    import jax
    from jax._src.lib.mlir import ir

    lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir()
    modules = []

    def walk(operation):
        for region in operation.regions:
            for block in region.blocks:
                for op in block.operations:
                    if (op.operation.name == "stablehlo.custom_call"
                            and ir.StringAttr(op.attributes["call_target_name"]).value.startswith("mosaic_gpu")):
                        modules.append(op.attributes["mhlo.backend_config"]["module"].value_bytes)
                    walk(op.operation)

    walk(lowered.operation)
    return modules


def cases(ops: set[str]):
    """(label, fn, args) at the benchmark shapes (`benchmarks/mixers.py`): bf16, chunks of 64. The sequence
    length does not change a kernel's code; spans=2 adds the SSD span state passes."""
    import jax
    import jax.numpy as jnp
    from mixers import FULL

    from hylo_jax.kernels import mosaic_ssd, pallas_common
    from hylo_jax.kernels.gated_delta import gated_delta_rule

    f32, bf16 = jnp.float32, jnp.bfloat16
    sds = jax.ShapeDtypeStruct
    b, t = 1, 1024
    if "ssd" in ops:
        for name, s in FULL["ssd"].items():
            h, p, n, g = s["h"], s["p"], s["n"], s["g"]
            args = (sds((b, t, h, p), bf16), sds((b, t, h), f32), sds((h,), f32), sds((b, t, g, n), bf16),
                    sds((b, t, g, n), bf16), sds((b, t), jnp.bool_), sds((b, h, p, n), f32))

            def loss(*a, spans):
                y, final = mosaic_ssd.ssd_mosaic(*a, chunk_size=64, spans=spans)
                return jnp.sum(y.astype(f32)) + jnp.sum(final)

            yield f"SSD {name} y", functools.partial(mosaic_ssd.ssd_mosaic, chunk_size=64, spans=1), args
            yield f"SSD {name} grad, 2 spans", jax.grad(functools.partial(loss, spans=2), argnums=(0, 1, 3, 4)), args
    if "gdn" in ops:
        s = FULL["gdn"]
        h, dk, dv = s["h"], s["dk"], s["dv"]

        def gdn(*a):
            with pallas_common.force_backend("mosaic_gpu", None):
                return gated_delta_rule(*a, use_qk_l2norm=True, impl="pallas")

        def gdn_loss(*a):
            o, final = gdn(*a)
            return jnp.sum(o.astype(f32)) + jnp.sum(final)

        for batch in (1, 4):  # value blocks of 32 (6 heads: the grid would not fill the GPU at 64) and 64
            args = (sds((batch, t, h, dk), bf16), sds((batch, t, h, dk), bf16), sds((batch, t, h, dv), bf16),
                    sds((batch, t, h), f32), sds((batch, t, h), f32))
            yield f"GDN o, batch {batch}", gdn, args
            yield f"GDN grad, batch {batch}", jax.grad(gdn_loss, argnums=range(5)), args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", required=True, help="jax-cuda12-pjrt wheel of the installed jax, or its .so")
    parser.add_argument("--cuda-root", default="/usr/local/cuda", help="where bin/ptxas is")
    parser.add_argument("--ops", default="ssd,gdn")
    parser.add_argument("--case", default="", help="only the cases whose label contains this, e.g. 'GDN o, batch 4'")
    parser.add_argument("--dump-ptx", metavar="DIR", help="also write each kernel's PTX (<kernel>_0.ptx) into DIR")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.compile_one:
        return compile_module(args.plugin, args.compile_one)

    from common import print_table

    if args.dump_ptx:
        os.makedirs(args.dump_ptx, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        plugin, driver = plugin_library(args.plugin, tmp), build_driver(tmp)
        rows, seen = [], set()
        for label, fn, fn_args in cases(set(args.ops.split(","))):
            if args.case not in label:
                continue
            for module in mosaic_modules(fn, *fn_args):
                if module in seen:
                    continue
                seen.add(module)
                r = resources(plugin, module, driver, args.cuda_root, args.dump_ptx)
                rows.append([label, r.get("kernel", "?"), r["registers"], r.get("spill_stores", "0"),
                             r.get("spill_loads", "0"), r.get("stack", "0")])
    print_table(["case", "kernel", "registers", "spill stores (B)", "spill loads (B)", "stack (B)"], rows)


if __name__ == "__main__":
    main()
