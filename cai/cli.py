"""The `cai` command line. Every command has --help; `cai --help` lists them."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from itertools import takewhile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from cai import __version__
from cai.constitution import (
    TEXT_SUFFIXES,
    ConstitutionError,
    bundled_constitutions,
    find_constitution,
    load_constitution,
    to_yaml,
)
from cai.errors import CaiError
from cai.models import DEFAULT_MODEL

_interrupted = False  # set by Ctrl-C (SIGINT); whatever the job raises after it, the job was interrupted
_reported = threading.Lock()
INTERRUPT_GRACE_S = 10.0  # how long an interrupted job may take to unwind before it exits regardless


def _on_interrupt(signum, frame) -> None:
    # vLLM swallows a KeyboardInterrupt during its engine's start-up and waits on; the timer ends the job all the same
    # (cai.reaper then stops what it started).
    global _interrupted
    if not _interrupted:
        _interrupted = True
        timer = threading.Timer(INTERRUPT_GRACE_S, _exit_interrupted)
        timer.daemon = True  # a job that unwinds in time exits without waiting for it
        timer.start()
    raise KeyboardInterrupt


def _report_interrupt() -> None:
    if not _reported.acquire(blocking=False):
        return
    words = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    command = " ".join(["cai", *takewhile(lambda a: not a.startswith("-"), words)])
    err_console.print(f"interrupted: {command} stopped; run the same command again to resume", highlight=False, markup=False)


def _exit_interrupted() -> None:
    _report_interrupt()
    sys.stderr.flush()
    os._exit(130)


def _starts_work(argv: list[str]) -> bool:
    """False for an invocation that only prints help or the version: it starts no process, so needs no watchdog."""
    return bool(argv) and not any(a in ("--help", "-h", "--version") for a in argv)


class _Cli(typer.Typer):
    """The `cai` app as its console script runs it: a watchdog (cai.reaper) ends every process the job started when
    the job ends, however it ends, and Ctrl-C stops the job with one line on stderr and exit code 130."""

    def __call__(self, *args, **kwargs):
        from cai.reaper import watch

        if _starts_work(sys.argv[1:]):
            watch(os.getpid())
        signal.signal(signal.SIGINT, _on_interrupt)
        try:
            return super().__call__(*args, **kwargs)
        except BaseException:
            if not _interrupted:
                raise
        _report_interrupt()
        sys.exit(130)


app = _Cli(
    help="cai: Constitutional AI and RLAIF. A constitution file in, an AI judge, synthetic data and a better model out.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
constitution_app = typer.Typer(help="Check and inspect constitution files.", no_args_is_help=True)
models_app = typer.Typer(help="Resolve and prepare models (the embedded default, local folders, hub ids).", no_args_is_help=True)
prompts_app = typer.Typer(help="Inspect prompt sources (built-in red-team and helpfulness sets, JSONL, datasets).", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")
app.add_typer(models_app, name="models")
judge_app = typer.Typer(help="The AI judge service (vLLM): serve it, or query one.", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
app.add_typer(judge_app, name="judge")
generate_app = typer.Typer(help="Turn a constitution plus prompts into training data (resumable).", no_args_is_help=True)
app.add_typer(generate_app, name="generate")

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"cai {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print cai's version and exit.", callback=_print_version, is_eager=True)] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    # One line per judge request buries the progress bars; --verbose brings them back.
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if not verbose:
        quiet_libraries()


def quiet_libraries() -> None:
    """Keep the terminal to cai's stages and progress bars: the libraries' own bars for each model load, shard
    written and dataset saved (tqdm, read when those libraries are imported, after this) and matplotlib's font cache
    note say nothing a user can act on. A variable the user set wins; --verbose keeps them all."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights", "Writing model shards"
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # datasets' "Saving the dataset"
    logging.getLogger("matplotlib").setLevel(logging.WARNING)


def _fail(message: str, code: int = 1) -> None:
    if not _interrupted:  # an error an interrupt caused is reported as the interrupt
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


# -- constitution -------------------------------------------------------------------


@constitution_app.command("lint")
def constitution_lint(
    files: Annotated[list[Path], typer.Argument(help="Constitution files (.yaml, or .txt/.md with one principle per paragraph) or shipped names such as harmless-helpful.")],
) -> None:
    """Validate constitution files; print every problem as FILE:LINE: FIELD: MESSAGE and exit 1 if any."""
    bad = 0
    for f in files:
        try:
            c = load_constitution(find_constitution(f))
        except ConstitutionError as e:
            bad += 1
            for p in e.problems:
                err_console.print(str(p), highlight=False, markup=False)
            continue
        console.print(f"{f}: ok ({c.name}, {len(c.principles)} principles, hash {c.short_hash})", highlight=False)
    if bad:
        err_console.print(f"{bad} of {len(files)} file(s) have problems", highlight=False)
        raise typer.Exit(1)


@constitution_app.command("show")
def constitution_show(
    file: Annotated[Path, typer.Argument(help="Constitution file (.yaml, .txt, .md) or shipped name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the validated constitution as JSON.")] = False,
) -> None:
    """Show a constitution: name, hash and its principles."""
    try:
        c = load_constitution(find_constitution(file))
    except ConstitutionError as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps({"hash": c.hash, **c.model_dump(mode="json")}))
        return
    console.print(f"[bold]{c.name}[/]  hash {c.hash}\n{c.description}\n")
    table = Table("id", "weight", "comparison question", show_lines=True)
    for p in c.principles:
        table.add_row(p.id, f"{p.weight:g}", p.comparison)
    console.print(table)
    console.print(f"{len(c.examples)} few-shot example(s)")


@constitution_app.command("convert")
def constitution_convert(
    file: Annotated[Path, typer.Argument(help="Plain-text constitution (.txt or .md): one principle per paragraph or list item.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="YAML file to write (default: FILE with .yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT if it exists.")] = False,
) -> None:
    """Write a plain-text constitution as YAML, to edit its critique and revision requests further.

    Each paragraph becomes a principle whose comparison question is the paragraph and whose critique
    and revision requests come from cai's template; the YAML loads to the same constitution hash.

    Example: cai constitution convert my-principles.md -o constitutions/mine.yaml
    """
    if file.suffix.lower() not in TEXT_SUFFIXES:
        _fail(f"{file}: convert reads .txt or .md files; {file.suffix or 'no suffix'} given")
    try:
        c = load_constitution(file)
        target = out or file.with_suffix(".yaml")
        if target.exists() and not force:
            _fail(f"{target} exists; pass --force to overwrite it or --out to write elsewhere")
        text = to_yaml(c, source=file.name)
    except ConstitutionError as e:
        _fail(str(e))
    from cai.files import write_text_atomic

    target.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(target, text)
    console.print(f"wrote {target} ({c.name}, {len(c.principles)} principles, hash {c.short_hash})", highlight=False)


@constitution_app.command("list")
def constitution_list() -> None:
    """List the constitutions shipped with cai."""
    for name, path in bundled_constitutions().items():
        try:
            c = load_constitution(path)
            console.print(f"{name:24s} {len(c.principles):3d} principles  {c.short_hash}  {path}", highlight=False)
        except ConstitutionError as e:
            console.print(f"{name:24s} INVALID: {e.problems[0]}", highlight=False)


# -- models -------------------------------------------------------------------------


@models_app.command("convert")
def models_convert(
    name: Annotated[str, typer.Argument(help="Embedded model name.")] = DEFAULT_MODEL,
    force: Annotated[bool, typer.Option(help="Convert again even if cached.")] = False,
) -> None:
    """Convert an embedded GGUF model into the cache once (later calls return at once)."""
    from cai.embedded import EMBEDDED, embedded_model_path
    from cai.errors import ModelResolutionError
    from cai.models import cache_dir

    if name not in EMBEDDED:
        _fail(f"{name!r} is not an embedded model; embedded: {', '.join(EMBEDDED)}")
    try:
        path = embedded_model_path(name, cache_dir(), force=force)
    except ModelResolutionError as e:
        _fail(str(e))
    console.print(str(path), highlight=False)


@models_app.command("resolve")
def models_resolve(name: Annotated[str, typer.Argument(help="Folder, hub id or embedded name.")]) -> None:
    """Print where a model name resolves to, and from which source."""
    from cai.errors import ModelResolutionError
    from cai.models import resolve_model

    try:
        m = resolve_model(name)
    except ModelResolutionError as e:
        _fail(str(e))
    console.print(json.dumps({"name": m.name, "path": m.path, "source": m.source}), highlight=False)


@models_app.command("tiny")
def models_tiny(
    folder: Annotated[Path, typer.Argument(help="Where to write the tiny random model.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.")] = 0,
) -> None:
    """Build a tiny random-weight model with a chat tokenizer (for tests and quick trials)."""
    from cai.tiny import build_tiny_model

    console.print(str(build_tiny_model(folder, seed=seed)), highlight=False)


# -- prompts ------------------------------------------------------------------------


@prompts_app.command("list")
def prompts_list() -> None:
    """List the built-in prompt sets with their licences."""
    from cai.prompts import BUILTIN_SETS

    table = Table("name", "package", "licence", "description")
    for name, info in BUILTIN_SETS.items():
        table.add_row(name, f"{info.package}=={info.version}", info.licence, info.description)
    console.print(table)


@prompts_app.command("show")
def prompts_show(
    spec: Annotated[str, typer.Argument(help="Built-in set name, a .jsonl/.json file, a datasets folder; join with '+'.")],
    limit: Annotated[int, typer.Option(help="How many to show.")] = 5,
    seed: Annotated[int, typer.Option(help="Shuffle seed (with --shuffle).")] = 0,
    shuffle: Annotated[bool, typer.Option(help="Seeded shuffle before the limit.")] = False,
) -> None:
    """Load a prompt source and print a few prompts with their stable ids."""
    from cai.prompts import PromptSourceError, load_prompts

    try:
        all_prompts = load_prompts(spec, seed=seed, shuffle=shuffle)
    except PromptSourceError as e:
        _fail(str(e))
    console.print(f"{len(all_prompts)} prompts from {spec}", highlight=False)
    for p in all_prompts[:limit]:
        console.print(f"[dim]{p.id}[/] [cyan]{p.category or ''}[/] {p.text}", highlight=False)


# -- judge --------------------------------------------------------------------------


def _serve(settings) -> None:
    from judge_server.server import serve

    serve(settings)


def _register_judge_serve() -> None:
    """`cai judge serve`: its options made from judge_server.settings.ServerSettings (as `python -m judge_server`)."""
    from cai.cli_options import settings_command
    from judge_server.settings import ServerSettings

    doc = """Serve critique, revision, comparison and scoring over HTTP for one constitution.

    Example: cai judge serve --model smollm2-135m-instruct --constitution constitutions/harmless-helpful.yaml
    """
    judge_app.command("serve")(settings_command(ServerSettings, _serve, doc=doc, on_error=_fail))


def _register_judge_eval() -> None:
    """`cai judge eval`: its options made from cai.judge_eval.JudgeEvalJob."""
    from cai.cli_options import settings_command
    from cai.judge_eval import JudgeEvalJob

    doc = """The judge against human labels, under one or more constitutions side by side: agreement (overall and per
    principle), position consistency, option mass, label entropy, calibration (Brier, ECE), each with a 95% interval,
    and each constitution's paired change in agreement against the first. Writes OUT/judge-eval.json and OUT/judge-eval.html.
    Run it after editing a constitution to see whether the edit helped.

    Example: cai judge eval --pairs hh-harmless --constitutions harmless-helpful,my.yaml --out runs/judge-eval
    """
    judge_app.command("eval")(settings_command(JudgeEvalJob, _print_summary(_run_judge_eval), doc=doc, on_error=_fail))


def _run_judge_eval(job):
    from cai.judge_eval import run_judge_eval

    return run_judge_eval(job)


def _register_constitution_learn() -> None:
    """`cai constitution learn`: its options made from cai.constitution.learn.LearnJob."""
    from cai.cli_options import settings_command
    from cai.constitution.learn import LearnJob

    doc = """Learn principles from where the judge and people disagree (Inverse Constitutional AI): the judge model proposes
    comparison questions that would explain people's choice on the pairs it gets most wrong; each is tested on held-out
    pairs against the constitution alone (paired change in agreement, 95% interval), and the ones that help are written
    to OUT with their figures. Idempotent: the same settings give the same file, every answer then from the judge cache.

    Example: cai constitution learn --pairs labelled.jsonl --out my.yaml --judge-model smollm2-135m-instruct --proposals 8
    """
    constitution_app.command("learn")(settings_command(LearnJob, _print_learned, doc=doc, on_error=_fail))


def _print_learned(job) -> None:
    from rich.table import Table

    from cai.constitution.learn import run_learn

    result = run_learn(job)
    table = Table(title=f"{len(result['candidates'])} proposal(s) tested on {len(result['held_out_pairs'])} held-out pairs "
                        f"({result['disagreements']} disagreement(s) to learn from, {len(result['replies'])} asked)")
    for column in ("question", "alone", "constitution", "with it", "change [95%]", "kept"):
        table.add_column(column, overflow="fold")
    for c in result["candidates"]:
        change = c["change"]
        table.add_row(c["question"], f"{c['agreement_alone']['value']:.3f}", f"{c['agreement_before']['value']:.3f}",
                      f"{c['agreement_with']['value']:.3f}",
                      f"{change['value']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}]", "yes" if c["helps"] else "no")
    console.print(table)
    unparsed = sum(r["question"] is None for r in result["replies"])
    console.print(f"{unparsed} of {len(result['replies'])} replies held no comparison question; {len(result['offered'])} "
                  f"principle(s) kept, written to {result['out']} (every figure in "
                  f"{Path(result['out']).with_suffix('.learn.json')})", highlight=False)


# -- generate -----------------------------------------------------------------------

def _register_generate_commands() -> None:
    """`cai generate sft|prefs`: their options made from the job models (cai/generate/sft.py, prefs.py); `merge` joins shards."""
    from cai.cli_options import settings_command
    from cai.generate.prefs import PrefsJob, generate_prefs
    from cai.generate.sft import SftJob, generate_sft

    docs = {"sft": """Critique -> revision SFT data: OUT/sft.jsonl and OUT/dataset with a `messages` column, trajectories and provenance.

    Example: cai generate sft --prompts donotanswer --limit 50 --out runs/sft-data
    """, "prefs": """AI-labelled preference pairs: OUT/prefs.jsonl and OUT/dataset with prompt, chosen, rejected, p_chosen and provenance.

    Example: cai generate prefs --prompts donotanswer+mtbench --limit 50 --samples 2 --out runs/prefs-data
    """}
    for name, schema, fn in (("sft", SftJob, generate_sft), ("prefs", PrefsJob, generate_prefs)):
        generate_app.command(name)(settings_command(schema, _print_summary(fn), doc=docs[name], on_error=_fail))

    @generate_app.command("merge")
    def generate_merge(
        shards: Annotated[list[Path], typer.Argument(help="Every shard's --out folder of one `cai generate sft|prefs --shard I/N` job.")],
        out: Annotated[Path, typer.Option("--out", help="New folder for the merged outputs, as the unsharded job writes them.")],
        keep_unrevised: Annotated[bool, typer.Option("--keep-unrevised/--no-keep-unrevised", help="sft: which rows train SFT, as "
                                                     "`cai generate sft --keep-unrevised` says; give it if the shards had it.")] = False,
    ) -> None:
        """Join the shards of a job into one dataset, each row once, in the unsharded job's order; the shards are only read.

        Example: cai generate merge runs/sft-1 runs/sft-2 --out runs/sft-data
        """
        from cai.generate.merge import merge_shards

        try:
            console.print_json(json.dumps(merge_shards(shards, out, keep_unrevised=keep_unrevised)))
        except CaiError as e:
            _fail(str(e))


# -- train --------------------------------------------------------------------------


train_app = typer.Typer(help="Train: sft (messages), rm (reward model on pairs), dpo (policy on pairs), ppo, grpo, rloo (RL "
                        "against a reward).",
                        no_args_is_help=True)
app.add_typer(train_app, name="train")

_TRAIN_DOCS = {
    "sft": """Supervised fine-tuning on `messages` rows (loss on the assistant turn only).

    Example: cai train sft --model smollm2-135m-instruct --data runs/sft-data/dataset --out runs/sft
    """,
    "rm": """A reward model (Bradley-Terry on soft labels) on prompt/chosen/rejected/p_chosen rows.

    Example: cai train rm --model smollm2-135m-instruct --data runs/prefs-data/dataset --out runs/rm
    """,
    "dpo": """DPO (soft labels) on prompt/chosen/rejected/p_chosen rows; the reference is the starting weights.

    Example: cai train dpo --config my.yaml --max-steps 20
    """,
    "ppo": """PPO with a KL penalty against the starting policy, scored by a reward model, the judge or a rule.

    Example: cai train ppo --model runs/sft/merged --reward runs/rm/final --prompts donotanswer --out runs/ppo
    """,
    "grpo": """GRPO: K answers per prompt (--num-generations), each scored against its group's mean, no value model;
    --advantage, --scale-rewards, --loss-aggregation and --kl-in give Dr. GRPO, DAPO and RLOO's variants.

    Example: cai train grpo --model runs/sft/merged --reward runs/rm/final --prompts donotanswer --out runs/grpo --batch-size 16
    """,
    "rloo": """RLOO: the grpo trainer with RLOO's defaults: leave-one-out baseline, unscaled, the KL folded into the score.

    Example: cai train rloo --model runs/sft/merged --reward runs/rm/final --prompts donotanswer --out runs/rloo --batch-size 16
    """,
    "online-dpo": """Online DPO from AI feedback: two answers per prompt from the current policy, labelled by the judge (both
    orders, a soft label; --reward judge:pairwise, the default) or by any reward's scores, then the DPO loss on the pairs.

    Example: cai train online-dpo --model runs/sft/merged --judge-url http://127.0.0.1:8000 --prompts donotanswer --out runs/odpo
    """,
}


def _print_summary(fn) -> Callable:
    def run(cfg) -> None:
        console.print_json(json.dumps(fn(cfg)))
    return run


def _run_training(cfg):
    from cai.train.run import run_training

    return run_training(cfg)


def _run_ppo(cfg):
    from cai.train.rl.ppo import run_ppo

    return run_ppo(cfg)


def _run_grpo(cfg):
    from cai.train.rl.grpo import run_grpo

    return run_grpo(cfg)


def _run_online_dpo(cfg):
    from cai.train.rl.online_dpo import run_online_dpo

    return run_online_dpo(cfg)


def _register_train_commands() -> None:
    """`cai train sft|rm|dpo|ppo|grpo|rloo`: every option made from the settings models (cai/train/settings.py, rl/settings.py)."""
    from cai.cli_options import settings_command
    from cai.train.rl.settings import GRPOJob, OnlineDPOJob, PPOJob, RLOOJob
    from cai.train.settings import TrainJob

    for kind in ("sft", "rm", "dpo"):
        train_app.command(kind)(settings_command(TrainJob, _print_summary(_run_training), fixed={"kind": kind}, doc=_TRAIN_DOCS[kind],
                                                 on_error=_fail))
    train_app.command("ppo")(settings_command(PPOJob, _print_summary(_run_ppo), doc=_TRAIN_DOCS["ppo"], on_error=_fail))
    for kind, job in (("grpo", GRPOJob), ("rloo", RLOOJob)):
        train_app.command(kind)(settings_command(job, _print_summary(_run_grpo), doc=_TRAIN_DOCS[kind], on_error=_fail))
    train_app.command("online-dpo")(settings_command(OnlineDPOJob, _print_summary(_run_online_dpo), doc=_TRAIN_DOCS["online-dpo"],
                                                     on_error=_fail))


# -- run, eval, report ---------------------------------------------------------------


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="Run config (YAML); `cai demo --show-config` prints one to start from.")],
    out: Annotated[Optional[str], typer.Option(help="Override the config's run folder.")] = None,
) -> None:
    """The whole pipeline: SFT data -> SFT -> preference data -> reward model -> PPO (or DPO) -> eval -> report.

    Each stage writes its own folder under the run folder; rerunning the same command skips finished
    stages and resumes an interrupted one. Ends by printing where report.html is.

    Example: cai run examples/gpu.yaml
    """
    from cai.run_config import load_run_config

    try:
        _run_pipeline(load_run_config(config, out), config)
    except CaiError as e:
        _fail(str(e))


def _run_pipeline(cfg, config_path: Path) -> None:
    from cai.pipeline import run_pipeline

    report = run_pipeline(cfg, config_path)
    stages = json.loads((Path(cfg.out) / "stages.json").read_text())["stages"]
    for s in stages:
        console.print(f"  {s['name']:<9} {s['status']:<8} {s['seconds'] or 0:>7.1f} s", highlight=False)
    ev = next((s.get("summary") for s in stages if s["name"] == "eval"), None) or {}
    eval_json = Path(cfg.out) / "eval" / "eval.json"
    if ev and eval_json.is_file():
        print_yardsticks(json.loads(eval_json.read_text(encoding="utf-8"))["yardsticks"])
    if ev:
        console.print(f"judge: win rate vs SFT {ev['win_rate']:.2f} (length-controlled {ev['lc_win_rate']:.2f}); "
                      f"monitors flagged: {', '.join(ev['flagged']) or 'none'}", highlight=False)
    console.print(f"[bold]report:[/] {report.resolve()}", highlight=False)


def print_yardsticks(table: dict) -> None:
    """The yardstick table in the terminal: each model's value, and the changes that left their interval."""
    console.print(f"yardsticks ({table['n_harmful']} harmful, {table['n_benign']} benign held-out prompts; 95% intervals):",
                  highlight=False)
    for row in table["rows"]:
        values = "  ".join(f"{m} {v['value']:.3g}" if v["value"] is not None else f"{m} -" for m, v in row["values"].items())
        moved = "; ".join(f"{c['from']}->{c['to']} {c['verdict']} ({c['value']:+.3g} [{c['low']:+.3g}, {c['high']:+.3g}])"
                          for c in row["changes"] if c["moved"])
        console.print(f"  {row['label']:<40} {values}{'   ' + moved if moved else ''}", highlight=False)
    if not any(c["moved"] for row in table["rows"] for c in row["changes"]):
        console.print("  no yardstick moved beyond its 95% interval", highlight=False)


def _run_eval(job) -> None:
    from cai.evaluate import run_eval

    doc = run_eval(job)
    print_yardsticks(doc["yardsticks"])
    console.print(f"judge: win rate {doc['win_rate']:.2f} [{doc['win_rate_ci'][0]:.2f}, {doc['win_rate_ci'][1]:.2f}], "
                  f"length-controlled {doc['lc_win_rate']:.2f}, {doc['n_prompts']} prompts", highlight=False)
    for m in doc["monitors"]:
        state = "not enough data" if m["figures"].get("insufficient") else ("FLAGGED" if m["flagged"] else "ok")
        console.print(f"  {m['name']:<15} {state:<15} {m['message']}", highlight=False)
    console.print(f"written to {job.out / 'eval.json'}", highlight=False)


def _register_eval() -> None:
    """`cai eval`: its options made from cai.evaluate.EvalJob."""
    from cai.cli_options import settings_command
    from cai.evaluate import EvalJob

    doc = """Each model on held-out prompts by yardsticks the judge cannot bend (refusal on harmful prompts,
    over-refusal on benign ones, toxicity, length, diversity; 95% intervals, paired for changes), the judge's
    win rate of the policy over the reference, and the failure-mode monitors.

    Example: cai eval --base smollm2-135m-instruct --reference runs/demo/sft/merged --policy runs/demo/dpo/merged
    --prompts runs/demo/prompts/eval.jsonl --human-pairs hh-harmless --out runs/eval
    """
    app.command("eval")(settings_command(EvalJob, _run_eval, doc=doc, on_error=_fail))


def _register_studio() -> None:
    """`cai studio CONSTITUTION`: its options made from cai.studio.settings.StudioSettings, the file as the argument."""
    import inspect

    from cai.cli_options import settings_command
    from cai.studio.settings import StudioSettings

    doc = """A constitution workbench in the browser: edit the principles as cards (saved to the file, atomically; edits made in
    your editor show up), try them on a prompt, and measure them against people's labels, re-asking only what an edit changed.

    Example: cai studio my.yaml --judge-model smollm2-135m-instruct, then open http://127.0.0.1:8765/
    """
    options = settings_command(StudioSettings, _run_studio, doc=doc, on_error=_fail)

    def studio(constitution: Annotated[Path, typer.Argument(help="The constitution file to edit (.yaml, .txt, .md).")], **given) -> None:
        options(**{**given, "constitution": str(constitution)})

    rest = [p for p in inspect.signature(options).parameters.values() if p.name != "constitution"]
    studio.__signature__ = inspect.signature(studio).replace(parameters=[inspect.signature(studio).parameters["constitution"], *rest])
    studio.__doc__ = doc
    app.command("studio")(studio)


def _run_studio(settings) -> None:
    from cai.studio.app import run_studio

    run_studio(settings)


@app.command("report")
def report_cmd(run_dir: Annotated[Path, typer.Argument(help="A run folder written by `cai run`.")]) -> None:
    """(Re)write RUN_DIR/report.html from what the run's stages wrote."""
    from cai.report import write_report

    if not run_dir.is_dir():
        _fail(f"{run_dir}: no such run folder")
    console.print(f"report: {write_report(run_dir).resolve()}", highlight=False)


# -- demo ---------------------------------------------------------------------------


@app.command("demo")
def demo(
    out: Annotated[Optional[str], typer.Option(help="Run folder (default runs/demo).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Policy and judge model (default: the embedded SmolLM2-135M-Instruct).")] = None,
    judge_url: Annotated[Optional[str], typer.Option(help="Use a running judge server instead of starting one.")] = None,
    show_config: Annotated[bool, typer.Option("--show-config", help="Print the demo's run config (to copy and edit) and exit.")] = False,
) -> None:
    """`cai run` on the demo config: the whole pipeline at sizes that finish on a 2-core CPU (what `make demo` runs).

    Example: cai demo --show-config > my-run.yaml && cai run my-run.yaml
    """
    from cai.run_config import DEMO_CONFIG, demo_config

    if show_config:
        console.print(DEMO_CONFIG.read_text(encoding="utf-8"), highlight=False, markup=False, end="")
        return
    try:
        _run_pipeline(demo_config(out=out, model=model, judge_url=judge_url), DEMO_CONFIG)
    except CaiError as e:
        _fail(str(e))


# The commands whose options are made from settings models (cai/cli_options.py).
_register_generate_commands()
_register_train_commands()
_register_judge_serve()
_register_judge_eval()
_register_constitution_learn()
_register_eval()
_register_studio()


if __name__ == "__main__":
    app()
