"""The `hylo` command: import, export, generate, upcycle, info, select-layers, train, plan, demo, eval, describe.

Every command takes `key=value` overrides after its flags (sections: model, mesh, sampling),
applied on top of `--config FILE.yaml` when given. Unknown keys are errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from hylo_jax.config import ConfigError, MeshConfig, ModelConfig, apply_overrides, describe, from_dict, load_yaml
from hylo_jax.errors import EvalError, HyloError
from hylo_jax.generate import SamplingConfig

log = logging.getLogger("hylo")

# Every config file has the shape of a RunConfig (teacher, hybrid, data, mesh, stages, ...);
# `model` (ModelConfig overrides), `sampling` and `eval` (EvalConfig) are accepted beside it.
RUN_KEYS = ("teacher", "kd_teacher", "out", "hybrid", "data", "mesh", "stage1", "stage2", "dtype", "param_dtype",
            "teacher_dtype", "remat", "seed", "eval_rows", "eval_seq_len", "tensorboard")
SECTIONS = (*RUN_KEYS, "model", "sampling", "eval")
DEFAULT_RUN = Path(__file__).resolve().parent.parent / "configs" / "smollm2-demo.yaml"


def _settings(args) -> dict:
    """The YAML config (if any) with command-line overrides applied, validated by section."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    data = apply_overrides(data, args.overrides)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(SECTIONS)}")
    return data


def _mesh(settings: dict):
    from hylo_jax.sharding import make_mesh

    return make_mesh(from_dict(MeshConfig, settings.get("mesh", {}), "mesh"))


def cmd_import(args) -> None:
    import jax
    from flax import nnx

    from hylo_jax.checkpoint import save_model
    from hylo_jax.convert.hf import hf_tokenizer, load_hf
    from hylo_jax.presets import resolve

    settings = _settings(args)
    path = resolve(args.hf)
    t0 = time.perf_counter()
    model, spec = load_hf(path, _mesh(settings), **settings.get("model", {}))
    tokenizer = hf_tokenizer(path)
    out = save_model(args.out, model, spec, tokenizer=tokenizer, source=str(args.hf))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    kind = spec.model.arch if spec.hybrid is None else f"{spec.model.arch} hybrid"
    print(f"imported {kind} ({n / 1e6:.1f}M parameters) from {args.hf} to {out} "
          f"in {time.perf_counter() - t0:.1f}s")


EXPORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """Bytes of a size such as 5GB, 500MB, 2GiB or 1000000."""
    number = text.rstrip("BbKkMmGgIi")
    unit = text[len(number):].upper()
    try:
        size = int(float(number) * SIZE_UNITS[unit])
    except (ValueError, KeyError):
        raise ConfigError(f"--max-shard-size {text!r}: give bytes or a size like 5GB, 500MB, 2GiB") from None
    if size <= 0:
        raise ConfigError(f"--max-shard-size {text!r} must be positive")
    return size


def cmd_export(args) -> None:
    from hylo_jax.export.writer import export_checkpoint

    settings = _settings(args)
    t0 = time.perf_counter()
    out = export_checkpoint(args.ckpt, args.out, _mesh(settings), dtype=EXPORT_DTYPES[args.dtype],
                            max_shard_size=parse_size(args.max_shard_size))
    print(f"exported {args.ckpt} to {out} ({args.dtype}) in {time.perf_counter() - t0:.1f}s")


def run_generate(ckpt: str | Path, prompt: str, settings: dict, *, chat: bool = True) -> str:
    """Loads a model folder and answers one prompt; returns the decoded continuation."""
    from hylo_jax.checkpoint import load_model, load_tokenizer
    from hylo_jax.generate import generate

    mesh = _mesh(settings)
    model, _ = load_model(ckpt, mesh, **settings.get("model", {}))
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise HyloError(f"{ckpt} has no tokenizer/ folder; re-import it from a folder with one")
    sampling = from_dict(SamplingConfig, settings.get("sampling", {}), "sampling")
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(prompt)["input_ids"]
    stop = [t for t in [tokenizer.eos_token_id] if t is not None]
    t0 = time.perf_counter()
    (out,) = generate(model, [list(ids)], sampling, stop_tokens=stop, mesh=mesh)
    log.info("generated %d tokens in %.2fs (compile included)", len(out), time.perf_counter() - t0)
    return tokenizer.decode(out, skip_special_tokens=True)


def cmd_generate(args) -> None:
    print(run_generate(args.ckpt, args.prompt, _settings(args), chat=not args.raw))


def _teacher_source(args, settings: dict) -> str:
    teacher = getattr(args, "teacher", None) or settings.get("teacher")
    if not teacher:
        raise ConfigError("no teacher: pass --teacher or set `teacher:` in the config")
    return str(teacher)


def _load_teacher(source: str, settings: dict):
    from hylo_jax.checkpoint import load_teacher

    return load_teacher(source, _mesh(settings), **settings.get("model", {}))


def _hybrid(settings: dict):
    from hylo_jax.models.hybrid import HybridConfig

    if "hybrid" not in settings:
        raise ConfigError("the config has no `hybrid:` section (see configs/hylo-*.yaml)")
    return from_dict(HybridConfig, settings["hybrid"], "hybrid")


def cmd_upcycle(args) -> None:
    from hylo_jax.checkpoint import save_model
    from hylo_jax.convert.upcycle import upcycle, with_energy_ranks
    from hylo_jax.info import report
    from hylo_jax.models.hybrid import ModelSpec

    settings = _settings(args)
    source = _teacher_source(args, settings)
    teacher, tokenizer = _load_teacher(source, settings)
    spec = ModelSpec.create(teacher.cfg, with_energy_ranks(teacher, _hybrid(settings)))
    t0 = time.perf_counter()
    student = upcycle(teacher, spec, seed=args.seed)
    out = save_model(args.out, student, spec, tokenizer=tokenizer, source=f"upcycled from {source}")
    print(report(spec))
    print(f"upcycled {source} -> {out} in {time.perf_counter() - t0:.1f}s")


def _shape_spec(settings: dict, config_path: str | None):
    """A ModelSpec from `teacher: NAME` (configs/teachers/NAME.yaml beside the config) + hybrid."""
    from hylo_jax.models.hybrid import ModelSpec

    name = settings.get("teacher")
    shape_file = Path(config_path or ".").parent / "teachers" / f"{name}.yaml"
    if not name or not shape_file.is_file():
        raise ConfigError(f"`teacher: {name}` has no shape file {shape_file}; give a model folder")
    model = from_dict(ModelConfig, {**load_yaml(shape_file)["model"], **settings.get("model", {})},
                      "model")
    return ModelSpec.create(model, _hybrid(settings) if "hybrid" in settings else None)


def cmd_info(args) -> None:
    from hylo_jax.checkpoint import read_spec
    from hylo_jax.info import report

    settings = _settings(args)
    if not args.ckpt and not args.config:
        raise ConfigError("hylo info needs --ckpt DIR or --config FILE")
    spec = read_spec(args.ckpt) if args.ckpt else _shape_spec(settings, args.config)
    print(report(spec))


def cmd_select_layers(args) -> None:
    import dataclasses

    import jax.numpy as jnp

    from hylo_jax.config import save_yaml, to_dict
    from hylo_jax.convert.select import sensitivity_ranking
    from hylo_jax.data.shakespeare import load_text

    settings = _settings(args)
    teacher, tokenizer = _load_teacher(_teacher_source(args, settings), settings)
    if tokenizer is None:
        raise ConfigError("select-layers needs the teacher's tokenizer to tokenise held-out text")
    text = Path(args.text).read_text() if args.text else "\n".join(load_text("heldout"))
    ids = tokenizer(text)["input_ids"]
    need = args.batch * args.seq_len
    if len(ids) < need:
        raise ConfigError(f"held-out text has {len(ids)} tokens, fewer than batch*seq_len={need}")
    tokens = jnp.asarray(ids[:need]).reshape(args.batch, args.seq_len)
    plan = _hybrid(settings)
    students = None
    if bool(args.mla_student) != bool(args.linear_student):
        raise ConfigError("give both --mla-student and --linear-student (the Stage I checkpoints) or neither")
    if args.mla_student:
        from hylo_jax.checkpoint import load_model

        students = tuple(load_model(d, _mesh(settings))[0] for d in (args.mla_student, args.linear_student))
    base, ranking = sensitivity_ranking(teacher, plan, tokens, seed=args.seed, students=students)
    print(f"all-linear student: KL to teacher {base:.4f}\nrank  layer  KL with this layer as MLA")
    for rank, (layer, kl) in enumerate(ranking, 1):
        print(f"{rank:>4}  {layer:>5}  {kl:.4f} ({kl - base:+.4f})")
    chosen = tuple(sorted(layer for layer, _ in ranking[: args.num_mla]))
    plan = dataclasses.replace(plan, mla_layers=chosen)
    if args.out:
        save_yaml({"teacher": settings.get("teacher"), "hybrid": to_dict(plan)}, args.out)
    print(f"chosen mla_layers: {list(chosen)}" + (f" (written to {args.out})" if args.out else ""))


def _run_config(args):
    from hylo_jax.train.trainer import RunConfig

    settings = _settings(args)
    extra = sorted(set(settings) - set(RUN_KEYS))
    if extra:
        raise ConfigError(f"`hylo train` takes a run config; sections {extra} do not belong in one")
    return from_dict(RunConfig, settings, "run")


def cmd_train(args) -> None:
    from hylo_jax.train.trainer import run

    run(_run_config(args))


def cmd_demo(args) -> None:
    """The embedded default job: upcycle SmolLM2-135M-Instruct into a hybrid and distil it."""
    from hylo_jax.train.trainer import run

    if args.config is None:
        if not DEFAULT_RUN.is_file():
            raise ConfigError(f"the demo config {DEFAULT_RUN} is missing; pass --config")
        args.config = str(DEFAULT_RUN)
    run(_run_config(args))


def cmd_eval(args) -> None:
    """RULER / perplexity / multiple choice / GSM8K of a model folder (and optionally a teacher)."""
    from hylo_jax.checkpoint import load_model, load_tokenizer
    from hylo_jax.eval.config import EvalConfig
    from hylo_jax.eval.runner import check_config, run

    settings = _settings(args)
    flags = {"tasks": args.tasks and args.tasks.split(","), "out": args.out, "samples": args.samples,
             "lengths": args.lengths and [int(n) for n in args.lengths.split(",")]}
    cfg = from_dict(EvalConfig, {**settings.get("eval", {}), **{k: v for k, v in flags.items() if v}}, "eval")
    check_config(cfg)
    model, _ = load_model(args.ckpt, _mesh(settings), **settings.get("model", {}))
    models = {"model": (model, load_tokenizer(args.ckpt))}
    if args.teacher:
        models["teacher"] = _load_teacher(args.teacher, settings)
    fallback = next((tok for _, tok in models.values() if tok is not None), None)
    if fallback is None:
        raise EvalError(f"{args.ckpt} has no tokenizer/ folder{' and neither has the teacher' * bool(args.teacher)}")
    run(cfg, {name: (m, tok or fallback) for name, (m, tok) in models.items()})


def cmd_plan(args) -> None:
    """Compiled memory per device and analytic FLOPs of every stage, from abstract parameters."""
    import dataclasses

    import jax

    from hylo_jax.models.hybrid import ModelSpec
    from hylo_jax.plan import plan_stage, report
    from hylo_jax.sharding import make_mesh

    run_cfg = _run_config(args)
    settings = _settings(args)
    shape = _shape_spec(settings, args.config)
    teacher_model = dataclasses.replace(shape.model, dtype=run_cfg.teacher_dtype, param_dtype=run_cfg.teacher_dtype)
    student_model = dataclasses.replace(shape.model, dtype=run_cfg.dtype, param_dtype=run_cfg.param_dtype,
                                        remat=run_cfg.remat)
    teacher = ModelSpec(teacher_model)
    mesh = make_mesh(run_cfg.mesh)
    every = tuple(range(student_model.num_layers))
    students = {"hybrid": run_cfg.hybrid}
    if run_cfg.stage1:
        students = {"all-mla": dataclasses.replace(run_cfg.hybrid, mla_layers=every, attention_layers=()),
                    "all-linear": dataclasses.replace(run_cfg.hybrid, mla_layers=(), attention_layers=()),
                    **students}
    rows = []
    wanted = set(args.stage or [])
    for stage in (*run_cfg.stage1, *run_cfg.stage2):
        if wanted and stage.name not in wanted:
            continue
        names = [n for n in students if (n != "hybrid") == (stage in run_cfg.stage1)]
        for name in names:
            hybrid = students[name]
            if stage.mla_rope is not None:
                hybrid = dataclasses.replace(hybrid, mla_rope=stage.mla_rope)
            spec = ModelSpec.create(student_model, hybrid)
            rows += plan_stage(spec, teacher, stage, mesh, student=name, seq_lens=args.seq_len or (),
                               remats=args.remat or (), cp_mode=run_cfg.mesh.context_parallel,
                               load_balance=run_cfg.mesh.load_balance)
            print(report(rows[-1:], mesh_sizes=dict(mesh.shape), device_memory=None).splitlines()[-1],
                  flush=True)
    memory = args.device_memory * 2**30 if args.device_memory else None
    print()
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    print(report(rows, mesh_sizes=dict(mesh.shape), device_memory=memory))
    if mesh.shape["sequence"] > 1:
        from hylo_jax.parallel.volume import table

        seq = max((*(args.seq_len or ()), *(s.seq_len for s in (*run_cfg.stage1, *run_cfg.stage2))))
        print()
        print(table(ModelSpec.create(student_model, run_cfg.hybrid), teacher, tokens=seq,
                    shards=mesh.shape["sequence"], dtype_bytes=2 if run_cfg.dtype != "float32" else 4))


def cmd_describe(args) -> None:
    del args
    from hylo_jax.eval.config import EvalConfig
    from hylo_jax.train.config import StageConfig
    from hylo_jax.train.trainer import RunConfig

    for name, cls in (("", RunConfig), ("stage1[i] / stage2[i]", StageConfig), ("model", ModelConfig),
                      ("sampling", SamplingConfig), ("eval", EvalConfig)):
        print(f"# {name or 'run'}: {cls.__doc__.splitlines()[0]}")
        print(describe(cls, f"{name}." if name else ""))


def _default_compilation_cache() -> str:
    """HYLO_COMPILATION_CACHE, else $XDG_CACHE_HOME/hylo_jax/xla (~/.cache/hylo_jax/xla)."""
    if "HYLO_COMPILATION_CACHE" in os.environ:
        return os.environ["HYLO_COMPILATION_CACHE"]
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hylo_jax" / "xla")


def _use_compilation_cache(path: str) -> None:
    """JAX's persistent compilation cache in `path` ("off": none), unless JAX_COMPILATION_CACHE_DIR already set
    one: a rerun, or a killed run resuming, loads its compiled steps instead of compiling them again (on 2 CPU
    cores the GDN op's gradient alone: 7.7 s -> 0.15 s)."""
    import jax

    if path == "off" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    log.debug("XLA compilation cache: %s", path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hylo", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, fn, help_text):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", help="YAML file with model/mesh/sampling sections")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mesh.tensor=2")
        g = p.add_argument_group("multi-host (see hylo_jax/parallel/distributed.py and launch/)")
        g.add_argument("--coordinator", help="HOST:PORT of process 0 (env HYLO_COORDINATOR)")
        g.add_argument("--num-processes", type=int, help="processes in the job (env HYLO_NUM_PROCESSES)")
        g.add_argument("--process-id", type=int, help="this process's rank (env HYLO_PROCESS_ID)")
        g.add_argument("--distributed", choices=("auto", "on", "off"), default="auto",
                       help="auto: explicit flags/env, SLURM with several tasks or a multi-host TPU VM; "
                            "on: jax's own cluster detection; off: one process")
        p.add_argument("--compilation-cache", default=_default_compilation_cache(),
                       help="folder of JAX's persistent compilation cache, or 'off' (env HYLO_COMPILATION_CACHE; "
                            "default %(default)s)")
        p.set_defaults(fn=fn)
        return p

    p = add("import", cmd_import, "import a Hugging Face / GGUF teacher (or an exported hybrid) into a "
                                  "hylo_jax model folder")
    p.add_argument("--hf", required=True, help="HF model folder, .gguf file, or preset (smollm2)")
    p.add_argument("--out", required=True, help="output folder")
    p = add("export", cmd_export, "write a model folder as a Hugging Face folder (PyTorch, safetensors)")
    p.add_argument("--ckpt", required=True, help="model folder (teacher or hybrid)")
    p.add_argument("--out", required=True, help="new Hugging Face folder")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="fp32", help="tensor dtype on disk")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (e.g. 5GB, 500MB)")
    p = add("generate", cmd_generate, "continue a prompt with a model folder")
    p.add_argument("--ckpt", required=True, help="model folder written by `hylo import`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add("train", cmd_train, "run the stages of a run config (resumes where it stopped)")
    add("demo", cmd_demo, "the default job: upcycle SmolLM2-135M on Shakespeare (configs/smollm2-demo.yaml)")
    p = add("upcycle", cmd_upcycle, "initialise a HyLo hybrid student from a teacher")
    p.add_argument("--teacher", help="teacher: hylo model folder, HF folder, .gguf, or preset "
                                     "(default: the config's `teacher:`)")
    p.add_argument("--out", required=True, help="student model folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised parameters")
    p = add("info", cmd_info, "parameters per component and decode-cache memory vs the teacher")
    p.add_argument("--ckpt", help="model folder (or give --config with teacher: + hybrid:)")
    p = add("select-layers", cmd_select_layers,
            "rank layers by how much MLA there lowers the KL to the teacher (Zebra-Llama search)")
    p.add_argument("--teacher", help="teacher (default: the config's `teacher:`)")
    p.add_argument("--num-mla", type=int, required=True, help="how many MLA layers to choose")
    p.add_argument("--out", help="write the chosen plan here (YAML)")
    p.add_argument("--text", help="held-out text file (default: Hamlet from the bundled corpus)")
    p.add_argument("--mla-student", help="all-MLA student folder (e.g. RUN/stage1-ild-mla/final)")
    p.add_argument("--linear-student", help="all-linear student folder (e.g. RUN/stage1-ild-linear/final)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p = add("eval", cmd_eval, "RULER, perplexity, multiple-choice and GSM8K evaluation of a model folder")
    p.add_argument("--ckpt", required=True, help="model folder")
    p.add_argument("--teacher", help="also evaluate this teacher (hylo or HF folder, .gguf, preset)")
    p.add_argument("--tasks", help="comma-separated: ruler,ppl,mc:FILE.jsonl,gsm8k:FILE.jsonl (eval.tasks)")
    p.add_argument("--lengths", help="comma-separated RULER lengths in tokens (eval.lengths)")
    p.add_argument("--samples", type=int, help="RULER samples per task and length (eval.samples)")
    p.add_argument("--out", help="output folder for results.json and ruler.png (eval.out)")
    p = add("plan", cmd_plan, "per-device memory (AOT compile from abstract parameters) and FLOPs of each "
                              "stage, and which context length / remat fits a device")
    p.add_argument("--stage", action="append", help="only this stage (repeatable; default: all)")
    p.add_argument("--seq-len", type=int, action="append", help="candidate context length (repeatable; "
                                                                 "default: the stage's)")
    p.add_argument("--remat", action="append", choices=("none", "save_attention_out", "dots_no_batch", "dots",
                                                        "full"),
                   help="candidate remat policy (repeatable; default: the stage's)")
    p.add_argument("--device-memory", type=float, help="GiB per device to fit in")
    add("describe", cmd_describe, "list every config key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax is chatty at INFO
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command != "describe":
            from hylo_jax.parallel.distributed import initialize

            _use_compilation_cache(args.compilation_cache)

            initialize(coordinator=args.coordinator, num_processes=args.num_processes,
                       process_id=args.process_id, mode=args.distributed)
        args.fn(args)
    except HyloError as e:
        print(f"hylo {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
