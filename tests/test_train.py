"""Trainers on the tiny model: what a step changes, exact resume, learning on a small set, data errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cai.errors import ConfigError
from cai.settings_file import load_settings
from cai.train.data import DatasetError, load_rows, tokenise_pairs, tokenise_sft
from cai.train.loop import train
from cai.train.run import run_training
from cai.train.settings import TrainJob
from cai.train.tasks import build_task, rm_metrics

PAIRS = [
    {"prompt": f"How do I do thing {i}?", "chosen": f"Here is a safe way to do thing {i}.", "rejected": f"Do something dangerous {i}!",
     "p_chosen": 0.9}
    for i in range(12)
]
SFT = [{"messages": [{"role": "user", "content": f"Say hello {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]} for i in range(12)]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(tmp_path, tiny_model_dir, kind, rows, **kw) -> TrainJob:
    data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
    base = dict(kind=kind, model=str(tiny_model_dir), data=data, out=str(tmp_path / f"out-{kind}"), batch_size=4, max_length=64,
                eval_fraction=0.0, lr=5e-3, checkpoint_every=2)
    return TrainJob(**{**base, **kw})


def test_one_sft_step_changes_the_adapter_and_nothing_else(tmp_path, tiny_model_dir):
    c = cfg(tmp_path, tiny_model_dir, "sft", SFT, max_steps=1)
    task = build_task(c, Path(c.out))
    before = {n: p.detach().cpu().clone() for n, p in task.model.named_parameters()}
    train(c, task, Path(c.out))
    after = {n: p.detach().cpu() for n, p in task.model.named_parameters()}  # the loop moves the model to the GPU, if any
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(torch.equal(before[n], after[n]) for n in after if n not in trainable)  # frozen base untouched
    assert any(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)
    # The adapter loads back with peft's from_pretrained on the base.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Path(c.out) / "final")
    name = next(n for n in trainable if "lora_B" in n)
    assert torch.allclose(dict(loaded.named_parameters())[name], after[name])


def test_resume_after_a_crash_gives_the_same_losses(tmp_path, tiny_model_dir):
    straight = cfg(tmp_path, tiny_model_dir, "sft", SFT, epochs=4, grad_accum=2, out=str(tmp_path / "straight"))
    run_training(straight)
    expected = [json.loads(line)["loss"] for line in (Path(straight.out) / "metrics.jsonl").read_text().splitlines()]
    assert len(expected) == 6  # 12 rows / 4 per micro-batch * 4 epochs / 2 micro-batches per step

    crashy = straight.model_copy(update={"out": str(tmp_path / "crashy")})
    task = build_task(crashy, Path(crashy.out))
    calls = {"n": 0}
    real_loss = task.loss

    def failing_loss(model, items, counts):
        calls["n"] += 1
        if calls["n"] == 9:  # inside step 5, after the checkpoint at step 4
            raise RuntimeError("simulated crash")
        return real_loss(model, items, counts)

    task.loss = failing_loss
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(crashy, task, Path(crashy.out))
    run_training(crashy)  # a fresh start, as after a kill: resumes from the step-4 checkpoint
    got = [json.loads(line)["loss"] for line in (Path(crashy.out) / "metrics.jsonl").read_text().splitlines()]
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_reward_model_learns_a_small_set_and_reports_calibration(tmp_path, tiny_model_dir):
    c = cfg(tmp_path, tiny_model_dir, "rm", PAIRS, lora=False, epochs=6, eval_fraction=0.25, lr=2e-3)
    summary = run_training(c)
    rows = [json.loads(line) for line in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
    ev = summary["eval"]
    assert ev["eval_pairs"] == 3 and {"accuracy", "mean_margin", "ece", "brier"} <= set(ev)
    assert (Path(c.out) / "loss.png").stat().st_size > 1000 and (Path(c.out) / "final" / "config.json").exists()


@pytest.mark.parametrize("lora,precision", [(True, "auto"), (False, "auto"), (False, "bf16"), (True, "bf16")],
                         ids=["lora", "full", "full-bf16", "lora-bf16"])
def test_dpo_raises_the_chosen_margin(tmp_path, tiny_model_dir, lora, precision):
    """With bf16 autocast (a GPU's default, forced here on the CPU) the reference must be computed at
    the policy's precision, or the margin at step 0 is the rounding error between the two."""
    c = cfg(tmp_path, tiny_model_dir, "dpo", PAIRS, epochs=4, beta=0.5, lora=lora, lr=5e-3 if lora else 1e-3, precision=precision)
    run_training(c)
    rows = [json.loads(line) for line in (Path(c.out) / "metrics.jsonl").read_text().splitlines()]
    # policy == reference at the start: each side's implicit reward is 0 (a precision mismatch gave 2e-4 here, 1e-3 on a GPU,
    # where kernels chosen for a pass with and without gradients may still round differently)
    tolerance = 1e-4 if torch.cuda.is_available() else 1e-6
    assert [rows[0][k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")] == pytest.approx([0.0] * 3, abs=tolerance)
    assert rows[-1]["rewards/margins"] > 0.1 and rows[-1]["loss"] < rows[0]["loss"]
    # Under bf16 autocast LoRA's frozen base loads in bf16 (the adapter stays float32); trained weights stay float32.
    if precision == "bf16":
        from cai.train.tasks import build_task

        model = build_task(c, Path(c.out)).model
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {p.dtype for p in model.parameters() if not p.requires_grad} <= ({torch.bfloat16} if lora else {torch.float32})
    # Training all weights moves the reference's own weights: it is computed up front and saved.
    assert (Path(c.out) / "ref_logprobs.pt").exists() == (not lora)
    assert (Path(c.out) / "final" / ("adapter_config.json" if lora else "config.json")).exists()


def test_rm_metrics_by_hand():
    m = rm_metrics([2.0, -1.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0])
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4) and m["mean_margin"] == 1.0


def test_data_errors_name_file_row_and_column(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(DatasetError, match=r"missing \['rejected'\]"):
        tokenise_pairs([{"prompt": "a", "chosen": "b"}], tok, "x.jsonl", 64)
    with pytest.raises(DatasetError, match=r"x.jsonl, row 2, column 'chosen': missing or empty"):
        tokenise_pairs([PAIRS[0], {**PAIRS[1], "chosen": " "}], tok, "x.jsonl", 64)
    with pytest.raises(DatasetError, match=r"row 1, column 'p_chosen'"):
        tokenise_pairs([{**PAIRS[0], "p_chosen": 1.5}], tok, "x.jsonl", 64)
    with pytest.raises(DatasetError, match=r"needs a 'messages' column"):
        tokenise_sft([{"text": "hi"}], tok, "s.jsonl", 64)
    with pytest.raises(DatasetError, match=r"row 1, column 'messages': the assistant turn is empty"):
        tokenise_sft([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}], tok, "s.jsonl", 64)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2: invalid JSON"):
        load_rows(bad)


def test_config_file_and_flag_errors(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("kind: sft\nmodel: m\ndata: d\nout: o\nlr: -1\nbatchsize: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: lr: Input should be greater than 0; batchsize: Extra inputs"):
        load_settings(path, {}, schema=TrainJob)
    c = load_settings(None, {"kind": "dpo", "model": "m", "data": "d", "out": "o", "beta": 0.2, "lr": None}, schema=TrainJob)
    assert c.beta == 0.2 and c.lr == 1e-4


HH = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless-dev.jsonl.gz"


@pytest.mark.slow
@pytest.mark.skipif(not HH.exists(), reason=f"{HH} not present (the human preference data beside the repo)")
def test_reward_model_on_human_labels_beats_chance(tmp_path):
    """A tiny reward model trained on ~1,500 HH-RLHF harmless pairs, judged on 300 held-out ones.

    Under chance (p = 0.5, n = 300) the accuracy's standard error is 0.029, so 0.55 is 1.7 of
    them: a model at chance passes with probability about 4%. This run measured 0.593.
    """
    import random

    from cai.tiny import build_tiny_model
    from cai.train.data import load_hh_pairs

    pairs = load_hh_pairs(HH)
    random.Random(0).shuffle(pairs)
    # The tokenizer (not the labels) learns from the texts, so the tiny model gets word-level tokens.
    corpus = [p["prompt"] + "\n" + p["chosen"] + "\n" + p["rejected"] for p in pairs[300:]]
    model = build_tiny_model(tmp_path / "tiny-hh", vocab_size=4096, corpus=corpus)
    data = write_jsonl(tmp_path / "hh.jsonl", pairs)
    c = TrainJob(kind="rm", model=str(model), data=data, out=str(tmp_path / "rm"), lora=False, lr=1e-3, batch_size=16, epochs=2,
                    max_length=256, eval_fraction=300 / len(pairs), checkpoint_every=10_000)
    ev = run_training(c)["eval"]
    assert ev["eval_pairs"] == 300
    assert ev["accuracy"] > 0.55, ev


# Rows of very different lengths (1 to 57 words), so that token means of different rows' groups differ.
UNEVEN_SFT = [{"messages": [{"role": "user", "content": f"Say hello {i}"},
                            {"role": "assistant", "content": " ".join(["hello"] * (1 + 7 * i))}]} for i in range(9)]
UNEVEN_PAIRS = [{"prompt": f"How do I do thing {i}?", "chosen": " ".join(["safe"] * (1 + 9 * (i % 4))),
                 "rejected": " ".join(["danger"] * (1 + 5 * (i % 3))), "p_chosen": [0.9, 0.3, 1.0][i % 3]} for i in range(9)]


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _same_steps(a: list[dict], b: list[dict], rel: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"], x["step"]
        for k in x:
            if k not in ("seconds", "step", "processes", "tokens"):
                assert y[k] == pytest.approx(x[k], rel=rel, abs=1e-6), (x["step"], k)


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_accumulated_micro_batches_equal_the_batch_at_once(tmp_path, tiny_model_dir, kind):
    """grad_accum=2 micro-batches of 2 rows equal one batch of 4 (the same rows: micro_batches cuts the same
    permutation): the step's loss is the mean over all its tokens (DPO: pairs, and the RPO NLL's tokens),
    not the mean of the micro-batches' means, so the losses, gradient norms and adapter agree."""
    rows = UNEVEN_SFT[:8] if kind == "sft" else UNEVEN_PAIRS[:8]
    extra = {"rpo_alpha": 1.0, "beta": 0.5} if kind == "dpo" else {}
    runs = {}
    for name, batch, accum in (("once", 4, 1), ("accum", 2, 2)):
        c = cfg(tmp_path, tiny_model_dir, kind, rows, batch_size=batch, grad_accum=accum, max_length=128, epochs=2,
                out=str(tmp_path / name), **extra)
        run_training(c)
        runs[name] = c
    assert len(_metrics(Path(runs["once"].out))) == 4
    _same_steps(_metrics(Path(runs["once"].out)), _metrics(Path(runs["accum"].out)), rel=1e-5)
    once, accum = _adapter(Path(runs["once"].out)), _adapter(Path(runs["accum"].out))
    # The steps' losses and gradient norms above are what a mean of micro-batch means breaks (by percents). The adapter
    # after 4 AdamW steps carries float32 summation-order noise that Adam's per-element normalisation amplifies where a
    # gradient is near zero: on one 2-core machine 2 of 34,816 DPO weights differed by 9e-6, hence atol 2e-5.
    for k in once:
        assert torch.allclose(accum[k], once[k], rtol=1e-4, atol=2e-5), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "rm", "dpo"])
def test_two_processes_train_like_one(tmp_path, tiny_model_dir, kind):
    """torchrun with 2 CPU processes (gloo DDP) against 1 process, on rows of very different lengths: each
    process weights its token (pair) mean by its share of the step's tokens (pairs), so the gradients DDP
    averages are the one-process gradients. 9 rows in micro-batches of 4, 2 per step: each epoch's single-row
    micro-batch leaves process 1 with none; it joins the collectives with zero weight. Losses, gradient norms, the
    logged metrics and tokens, and the adapter equal the one-process run's to float tolerance."""
    import sys

    from tests.fsdp_on_cpu import launch, run_ok

    data = write_jsonl(tmp_path / "rows.jsonl", UNEVEN_SFT if kind == "sft" else UNEVEN_PAIRS)
    args = ["train", kind, "--model", str(tiny_model_dir), "--data", data, "--epochs", "2", "--batch-size", "4", "--grad-accum", "2",
            "--max-length", "128", "--eval-fraction", "0", "--lr", "5e-3", *(["--rpo-alpha", "1.0"] if kind == "dpo" else [])]
    run_ok([sys.executable, "-m", "cai.cli", *args, "--out", str(tmp_path / "one")])
    run_ok(launch([*args, "--out", str(tmp_path / "two")], fsdp=False))
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert {r["processes"] for r in one} == {1} and {r["processes"] for r in two} == {2}
    assert len(one) == 3  # micro-batches of 4, 4, 1 rows per epoch, 2 per step: [4, 4], [1, 4], [4, 1]
    _same_steps(one, two, rel=1e-5)
    assert one[-1]["loss"] < one[0]["loss"]  # it trained
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    assert set(a) == set(b) and any("lora_B" in k for k in a)
    # Different padding widths round differently (losses agree to 1e-6 here), and Adam scales each element by its own
    # gradient's RMS, so elements with near-zero gradients carry that rounding into the weights: 2e-5 seen on weights
    # of 0.1 (lr 5e-3 per step), a relative (Frobenius) error of 1.6e-5 at most.
    for k in a:
        assert torch.allclose(b[k], a[k], rtol=1e-3, atol=1e-4), (k, (b[k] - a[k]).abs().max().item())
        assert ((b[k] - a[k]).norm() / a[k].norm()).item() < 1e-4, k


def test_a_truncated_pair_conditions_both_sides_on_the_same_prompt_tokens(tiny_model_dir):
    """A 300-token prompt, a 900-token chosen and a 100-token rejected at max_length 1024: the prompt
    is cut once for the pair, so DPO and the reward model compare log p(y_c | x) with log p(y_r | x)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def text_of(n_tokens: int, word: str) -> str:
        text = " ".join([word] * n_tokens)
        while len(tok.encode(text, add_special_tokens=False)) > n_tokens:
            text = text.rsplit(" ", 1)[0]
        return text

    row = {"prompt": text_of(300, "prompt"), "chosen": text_of(900, "chosen"), "rejected": text_of(100, "rejected")}
    (pair,) = tokenise_pairs([row], tok, "long.jsonl", max_length=1024)

    def prompt_part(t):
        return [i for i, m in zip(t.input_ids, t.loss_mask) if m == 0]

    assert len(pair.chosen.input_ids) <= 1024 and len(pair.rejected.input_ids) <= 1024
    assert prompt_part(pair.chosen) == prompt_part(pair.rejected)
    assert 256 <= len(prompt_part(pair.chosen)) < 300  # cut from the start, by the longer side
    assert sum(pair.rejected.loss_mask) > 90 and sum(pair.chosen.loss_mask) == 1024 - len(prompt_part(pair.chosen))
    # Nothing to cut: the whole prompt and both answers are kept.
    (short,) = tokenise_pairs([{**row, "chosen": text_of(100, "chosen")}], tok, "short.jsonl", max_length=1024)
    full_prompt = prompt_part(short.chosen)
    assert full_prompt == prompt_part(short.rejected) and len(full_prompt) > 300 - 1
    assert prompt_part(pair.chosen) == full_prompt[len(full_prompt) - len(prompt_part(pair.chosen)):]


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "final" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("kind,precision", [("sft", "auto"), ("rm", "auto"), ("dpo", "auto"), ("sft", "bf16")],
                         ids=["sft", "rm", "dpo", "sft-bf16"])
def test_fsdp_shards_the_weights_and_trains_like_ddp(tmp_path, tiny_model_dir, kind, precision):
    """accelerate's FSDP2 (examples/accelerate/fsdp.yaml, 2 gloo CPU processes; see tests/fsdp_on_cpu.py)
    against plain DDP with the same 2 processes: each process takes the same rows, so the losses, gradient
    norms (clipping sees the whole gradient, not a shard), held-out metrics (every process evaluates
    with the sharded weights) and the saved adapter (gathered whole; the reward head with it) agree.
    DPO's reference pass switches the adapter off without freezing the shards the optimiser holds, and every
    process runs as many reference passes as the other. With bf16 (a GPU's default, forced here) FSDP holds
    a bf16 frozen base and an fp32 adapter in the same units; the two launches then agree to bf16's rounding.
    DPO's FSDP launch also recomputes its layers' activations in the backward (--gradient-checkpointing), which
    must change nothing."""
    from tests.fsdp_on_cpu import launch, run_ok

    data = write_jsonl(tmp_path / "rows.jsonl", SFT if kind == "sft" else PAIRS)
    args = ["train", kind, "--model", str(tiny_model_dir), "--data", data, "--epochs", "2", "--batch-size", "4",
            "--eval-fraction", "0.25", "--lr", "5e-3", "--precision", precision]
    tol = dict(rel=1e-2, abs=1e-4) if precision == "bf16" else dict(rel=1e-4, abs=1e-6)
    # Adam divides each gradient element by its own running scale, so an element whose gradient is near 0 steps by
    # its rounding: with bf16 up to lr (1.4e-3 seen after 6 steps); in fp32 the two launches' different reduction
    # orders moved 1 of 1,024 elements of an adapter matrix by 5.6e-6 (lr 5e-3). A gather gone wrong is ~1e-2.
    weight_atol = 5e-3 if precision == "bf16" else 2e-5
    run_ok(launch([*args, "--out", str(tmp_path / "ddp")], fsdp=False))
    recompute = ["--gradient-checkpointing"] if kind == "dpo" else []
    run_ok(launch([*args, *recompute, "--out", str(tmp_path / "fsdp")], fsdp=True))
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in ("ddp", "fsdp")}
    assert (summaries["ddp"]["distributed"], summaries["ddp"]["sharded"]) == ("MULTI_CPU", False)
    assert (summaries["fsdp"]["distributed"], summaries["fsdp"]["sharded"]) == ("FSDP", True)
    assert summaries["ddp"]["fsdp_units"] == 0 and summaries["fsdp"]["fsdp_units"] >= 4  # the root, the embeddings, each layer
    assert summaries["fsdp"]["eval"] and summaries["fsdp"]["eval"] == pytest.approx(summaries["ddp"]["eval"], **tol)
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    fsdp = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(fsdp) == len(ddp) == 6 and [r["tokens"] for r in fsdp] == [r["tokens"] for r in ddp]
    for a, b in zip(ddp, fsdp):
        for k in a:
            if k not in ("seconds", "tokens", "step", "processes", "lr"):
                assert b[k] == pytest.approx(a[k], **tol), (a["step"], k)
    assert ddp[-1]["loss"] < ddp[0]["loss"]  # it trained
    whole, gathered = _adapter(tmp_path / "ddp"), _adapter(tmp_path / "fsdp")
    assert set(gathered) == set(whole) and any("lora_B" in k for k in whole)
    assert kind != "rm" or any("score" in k for k in whole)
    for k in whole:
        assert gathered[k].dtype == whole[k].dtype == torch.float32, k  # the adapter trains in fp32 under bf16 autocast too
        assert gathered[k].shape == whole[k].shape and torch.allclose(gathered[k], whole[k], rtol=tol["rel"], atol=weight_atol), k


CRASHING_TRAIN = '''
import json, sys
from pathlib import Path
from cai.train.settings import TrainJob, pin_trainer_settings
from cai.train.loop import train
from cai.train.tasks import build_task

cfg = TrainJob(**json.loads(Path(sys.argv[1]).read_text()))
pin_trainer_settings(cfg, Path(cfg.out))
task = build_task(cfg, Path(cfg.out))
real, calls = task.loss, {"n": 0}

def crashing(model, items, counts):  # every process crashes in the same micro-batch
    calls["n"] += 1
    if calls["n"] == int(sys.argv[2]):
        raise RuntimeError("simulated crash")
    return real(model, items, counts)

task.loss = crashing
train(cfg, task, Path(cfg.out))
'''


@pytest.mark.slow
def test_an_fsdp_run_resumes_after_a_crash(tmp_path, tiny_model_dir):
    """Under FSDP the checkpoint gathers the sharded adapter and optimiser state into the usual one file
    and a restart shards it again: a run that crashes in step 5 (checkpoint at 4) and is rerun with the
    same command logs what the uninterrupted FSDP run logged."""
    import subprocess

    from tests.fsdp_on_cpu import cpu_env, launch, run_ok

    settings = dict(kind="sft", model=str(tiny_model_dir), data=write_jsonl(tmp_path / "sft.jsonl", SFT), epochs=4, grad_accum=2,
                    batch_size=4, eval_fraction=0.0, lr=5e-3, checkpoint_every=2)
    args = ["train", "sft", *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items() if k != "kind"]]
    run_ok(launch([*args, "--out", str(tmp_path / "straight")], fsdp=True))
    crashy = tmp_path / "crashy"
    (tmp_path / "cfg.json").write_text(json.dumps({**settings, "out": str(crashy)}))
    (tmp_path / "crash.py").write_text(CRASHING_TRAIN)
    crashed = subprocess.run(launch([str(tmp_path / "crash.py"), str(tmp_path / "cfg.json"), "9"], fsdp=True), env=cpu_env(),
                             capture_output=True, text=True)
    assert crashed.returncode != 0 and "simulated crash" in crashed.stderr, crashed.stderr[-3000:]
    state = torch.load(crashy / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["sharded"] and state["trainable"]
    assert all(not type(v).__name__.startswith("DTensor") for v in state["trainable"].values())  # whole tensors, not shards
    run_ok(launch([*args, "--out", str(crashy)], fsdp=True))
    straight = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (crashy / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert (b["loss"], b["grad_norm"]) == pytest.approx((a["loss"], a["grad_norm"]), rel=1e-5, abs=1e-7), a["step"]
