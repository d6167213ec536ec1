"""`cai run` end to end on the tiny model against the real judge server, and its resume rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cai.pinning import RunMismatchError
from cai.pipeline import run_pipeline
from cai.run_config import RunConfigError, load_run_config
from tests.conftest import JUDGE_KEY


def tiny_config(tmp_path: Path, tiny_model_dir: Path, judge_url: str, **over) -> Path:
    cfg = {
        "out": str(tmp_path / "run"), "model": str(tiny_model_dir), "policy_backend": "transformers",
        "judge": {"url": judge_url},
        "prompts": {"source": "donotanswer+mtbench", "n_eval": 6, "n_sft": 6, "n_prefs": 6, "n_rl": 8, "probes": 12},
        # the tiny judge revises to nothing: its first answers are kept, so that SFT has rows to train the mechanics on
        "sft_data": {"rounds": 1, "max_new_tokens": 12, "critique_tokens": 8, "revision_tokens": 12, "keep_unrevised": True},
        "sft": {"epochs": 1, "max_length": 128},
        "prefs": {"samples": 2, "max_new_tokens": 12},
        "rm": {"epochs": 1, "max_length": 128},
        "rl": {"method": "ppo", "ppo": {"iterations": 4, "batch_size": 4, "response_length": 12, "gold_judge_every": 1}},
        "eval": {"max_new_tokens": 12, "human_pairs": str(Path(__file__).parent / "data" / "human_pairs.jsonl")},
        **over,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_whole_pipeline_on_the_tiny_model_then_a_rerun_skips_finished_stages(tmp_path, tiny_model_dir, judge, monkeypatch, capsys):
    import cai.pipeline as pipeline

    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    cfg = load_run_config(tiny_config(tmp_path, tiny_model_dir, judge.url))

    # First run dies in the eval stage, as a killed run would.
    def dying(run):
        raise RuntimeError("killed during eval")

    monkeypatch.setattr(pipeline, "evaluate", dying)
    with pytest.raises(RuntimeError, match="killed during eval"):
        run_pipeline(cfg)
    monkeypatch.undo()
    monkeypatch.setenv("CAI_JUDGE_API_KEY", JUDGE_KEY)
    run = Path(cfg.out)
    before = {s["name"]: s for s in json.loads((run / "stages.json").read_text())["stages"]}
    assert before["eval"]["status"] == "running" and before["ppo"]["status"] == "done"
    ppo_metrics = (run / "ppo" / "metrics.jsonl").stat().st_mtime_ns

    capsys.readouterr()
    report = run_pipeline(cfg)  # the same command again: only eval runs
    shown = capsys.readouterr().out
    for bar in ("eval: base answers", "eval: policy answers", "eval: reference answers", "eval: judge comparisons",
                "eval: judge on human-labelled pairs"):  # progress, rate and ETA
        assert bar in shown and "ETA" in shown.split(bar, 1)[1].split("\n", 1)[0], shown
    after = {s["name"]: s for s in json.loads((run / "stages.json").read_text())["stages"]}
    assert all(s["status"] == "done" for s in after.values())
    assert (run / "ppo" / "metrics.jsonl").stat().st_mtime_ns == ppo_metrics
    assert after["ppo"]["seconds"] == before["ppo"]["seconds"]

    # Every stage left its outputs where the next one (and the user) looks for them.
    prompts = {name: [json.loads(line)["id"] for line in (run / "prompts" / f"{name}.jsonl").read_text().splitlines()]
               for name in ("eval", "sft", "prefs", "rl")}
    assert len(prompts["eval"]) == 12 and not set(prompts["eval"]) & (set(prompts["sft"]) | set(prompts["prefs"]) | set(prompts["rl"]))
    kinds = [json.loads(line)["kind"] for line in (run / "prompts" / "eval.jsonl").read_text().splitlines()]
    assert kinds == ["harmful"] * 6 + ["benign"] * 6  # n_eval of each kind
    assert (run / "sft-data" / "dataset").is_dir() and (run / "prefs" / "dataset").is_dir()
    assert (run / "sft" / "merged" / "config.json").exists() and (run / "ppo" / "merged" / "config.json").exists()
    assert (run / "rm" / "final" / "adapter_config.json").exists()
    doc = json.loads((run / "eval" / "eval.json").read_text())
    assert doc["n_prompts"] == 12 and 0.0 <= doc["win_rate"] <= 1.0 and 0.0 <= doc["lc_win_rate"] <= 1.0
    table = doc["yardsticks"]
    assert table["models"] == ["base", "reference", "policy"] and (table["n_harmful"], table["n_benign"]) == (6, 6)
    assert [r["name"] for r in table["rows"]] == ["refusal_harmful", "refusal_benign", "toxicity_mean", "toxicity_share",
                                                  "length_tokens", "distinct_2"]
    for row in table["rows"]:  # every model measured, every change with a paired interval around its value
        assert all(v["n"] == row["n"] for v in row["values"].values())
        assert [(c["from"], c["to"]) for c in row["changes"]] == [("base", "reference"), ("reference", "policy"), ("base", "policy")]
        assert all(c["low"] <= c["value"] <= c["high"] for c in row["changes"])
    lengths = next(r for r in table["rows"] if r["name"] == "length_tokens")["values"]
    assert lengths["policy"]["value"] == pytest.approx(doc["lengths"]["policy_mean"])
    trust = doc["judge_trust"]
    assert trust["human_agreement"]["n"] == 8 and 0.0 <= trust["human_agreement"]["value"] <= 1.0
    assert 0.0 < trust["option_mass"]["value"] <= 1.0 and trust["same_position"]["n"] == 12
    assert [m["name"] for m in doc["monitors"]] == ["reward_hacking", "verbosity", "mode_collapse", "sycophancy", "position_bias"]
    assert len(doc["reward_hacking"]) == 4  # the judge scored PPO's samples at every iteration
    html = report.read_text()
    assert html.index("What each stage did, measured without the judge") < html.index("Monitors")  # the first screen
    for section in ("Monitors", "Reward model", "PPO", "proxy and gold reward against KL", "Before and after",
                    "judge agreement with humans", "over-refusal on benign prompts"):
        assert section in html, section

    # Other settings in the same folder are refused, not mixed in.
    changed = load_run_config(tiny_config(tmp_path, tiny_model_dir, judge.url, seed=1))
    with pytest.raises(RunMismatchError, match="seed"):
        run_pipeline(changed)


def refused(tmp_path: Path, text: str, pattern: str) -> None:
    """The run config `text`, as bad.yaml, is refused when it loads, with an error matching `pattern`."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RunConfigError, match=pattern):
        load_run_config(bad)


def test_run_config_errors_name_the_file_and_field(tmp_path):
    refused(tmp_path, "out: runs/x\nrl:\n  method: sac\n", r"bad.yaml: rl.method")
    refused(tmp_path, "out: runs/x\nprompt:\n  source: mtbench\n", r"bad.yaml: prompt: Extra inputs")
    with pytest.raises(RunConfigError, match="no such config file"):
        load_run_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("section,line", [("rl.ppo", "rl:\n  ppo:\n    kl_coeff: 0.1\n"), ("rl.dpo", "rl:\n  dpo:\n    betta: 0.1\n"),
                                          ("sft", "sft:\n  epoch: 2\n"), ("rm", "rm:\n  lora_rank: 4\n"),
                                          ("sft_data", "sft_data:\n  round: 2\n"), ("judge", "judge:\n  modle: x\n")])
def test_a_misspelt_key_anywhere_is_refused_before_any_stage_runs(tmp_path, section, line):
    """Every stage's settings are typed, so the whole file is checked when it loads, not when the
    stage that reads the key starts after the others have run."""
    bad = tmp_path / "typo.yaml"
    bad.write_text(f"out: {tmp_path / 'run'}\n{line}")
    key = line.strip().split("\n")[-1].strip().split(":")[0]
    with pytest.raises(RunConfigError, match=rf"typo.yaml: {section}\.{key}: Extra inputs are not permitted"):
        load_run_config(bad)
    assert not (tmp_path / "run").exists()  # nothing ran, nothing was written


def test_prefs_from_revisions_trains_on_the_sft_datas_revision_pairs_without_the_judge(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from cai.pipeline import Run, prefs
    from cai.train.data import load_rows, tokenise_pairs

    path = tmp_path / "c.yaml"
    path.write_text(f"out: {tmp_path / 'run'}\nprefs:\n  source: revisions\n")
    run = Run(load_run_config(path), judge_url=None)  # no judge: this source needs none
    sft_data = run.stage_dir("sft-data")
    sft_data.mkdir(parents=True)
    pairs = [{"id": f"p{i}", "prompt": f"How do I do thing {i}?", "chosen": "I can't help with that.", "rejected": f"Do {i}!",
              "p_chosen": 1.0, "source": "revision", "provenance": {"rounds": 1}} for i in range(3)]
    (sft_data / "revision_pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    summary = prefs(run)
    assert summary == {"source": "revisions", "revision_pairs": 3, "pairs": 3}
    rows = load_rows(run.stage_dir("prefs") / "pairs")
    assert [r["chosen"] for r in rows] == ["I can't help with that."] * 3 and {r["source"] for r in rows} == {"revision"}
    assert len(tokenise_pairs(rows, AutoTokenizer.from_pretrained(tiny_model_dir), "pairs", 64)) == 3  # what rm and dpo read
    (sft_data / "revision_pairs.jsonl").write_text("")
    with pytest.raises(RunConfigError, match="prefs.source 'revisions' gave no pairs to train on"):
        prefs(run)
    (sft_data / "summary.json").write_text(json.dumps({"revisions_rejected": {"total": 3, "of": 3, "repeats the critique": 3}}))
    with pytest.raises(RunConfigError, match=r"on: sft-data rejected 3 of the judge's 3 revisions \(repeats the critique: 3\); "
                                             r"a larger judge.model revises, or prefs.source: judge \| both"):
        prefs(run)


def test_sft_stage_refuses_to_train_when_sft_data_kept_no_row_and_says_why(tmp_path):
    from cai.pipeline import Run, sft

    path = tmp_path / "c.yaml"
    path.write_text(f"out: {tmp_path / 'run'}\n")
    run = Run(load_run_config(path), judge_url=None)
    assert run.cfg.sft_data.keep_unrevised is False  # rows never revised are not SFT targets unless asked for
    sft_data = run.stage_dir("sft-data")
    sft_data.mkdir(parents=True)
    (sft_data / "sft.jsonl").write_text("")  # what sft-data writes when it keeps no row
    (sft_data / "summary.json").write_text(json.dumps({
        "rows": 0, "rows_revised": 0, "rows_dropped_unrevised": 5,
        "revisions_rejected": {"total": 5, "of": 5, "repeats the critique": 3, "unchanged": 2}}))
    with pytest.raises(RunConfigError, match=r"sft: no SFT rows to train on: sft-data dropped all 5 of its rows because none "
                                             r"was revised \(the judge's revisions rejected: 5 of 5; repeats the critique: 3, "
                                             r"unchanged: 2\).*A larger judge.model.*sft_data.keep_unrevised: true"):
        sft(run)
    assert not run.stage_dir("sft").exists()  # refused before any training


def test_eval_thresholds_are_checked_against_the_monitors_when_the_file_loads(tmp_path):
    thresholds = "out: o\neval:\n  thresholds:\n    {}:\n      {}: 2.0\n"
    refused(tmp_path, thresholds.format("verbosty", "max_growth"), r"bad.yaml: eval.thresholds: Value error, unknown monitor 'verbosty'")
    refused(tmp_path, thresholds.format("verbosity", "max_grwth"), r"verbosity has no threshold 'max_grwth'; its thresholds are max_growth, ")
    good = tmp_path / "good.yaml"
    good.write_text(thresholds.format("verbosity", "max_growth"))
    assert load_run_config(good).eval.thresholds == {"verbosity": {"max_growth": 2.0}}


def test_stage_sections_keep_the_pipeline_sizes_under_what_the_file_gives(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("out: o\nsft:\n  lr: 0.001\nrl:\n  ppo:\n    iterations: 3\n")
    cfg = load_run_config(path)
    assert (cfg.sft.lr, cfg.sft.epochs, cfg.sft.max_length, cfg.sft.eval_fraction) == (0.001, 2, 384, 0.0)
    assert cfg.rm.eval_fraction == 0.2 and cfg.rl.dpo.epochs == 2
    assert (cfg.rl.ppo.iterations, cfg.rl.ppo.batch_size, cfg.rl.ppo.response_length) == (3, 8, 48)
    path.write_text("out: o\nrl:\n  ppo:\n    batch_size: 6\n    mini_batches: 4\n")
    with pytest.raises(RunConfigError, match=r"c.yaml: rl.ppo: Value error, batch_size \(6\) must be divisible by mini_batches \(4\)"):
        load_run_config(path)


def test_shipped_example_configs_load():
    from cai.run_config import DEMO_CONFIG

    for path in (DEMO_CONFIG, Path(__file__).resolve().parents[1] / "examples" / "gpu.yaml"):
        cfg = load_run_config(path)
        assert cfg.rl.method in ("ppo", "dpo")


@pytest.mark.parametrize("method", ["ppo", "grpo", "rloo", "online_dpo", "dpo"])
def test_each_rl_method_is_a_stage_with_its_own_section(tmp_path, method):
    from cai.pipeline import stages

    path = tmp_path / "c.yaml"
    path.write_text(f"out: o\nrl:\n  method: {method}\n")
    cfg = load_run_config(path)
    names = [name for name, _ in stages(cfg)]
    assert names == ["prompts", "sft-data", "sft", "prefs", "rm", method, "eval"]
    assert (cfg.rl.grpo.advantage, cfg.rl.grpo.scale_rewards, cfg.rl.grpo.kl_in) == ("grpo", "group", "loss")
    assert (cfg.rl.rloo.advantage, cfg.rl.rloo.scale_rewards, cfg.rl.rloo.kl_in) == ("rloo", "none", "reward")  # `cai train rloo`'s
    for section in (cfg.rl.ppo, cfg.rl.grpo, cfg.rl.rloo, cfg.rl.online_dpo):  # the pipeline's sizes
        assert (section.iterations, section.batch_size, section.response_length, section.gold_judge_every) == (10, 8, 48, 2)


def test_the_online_sections_take_their_commands_defaults_but_the_pipelines_sizes():
    from cai.run_config import RunConfig
    from cai.train.rl.settings import GRPOSettings, OnlineDPOSettings, RLOOJob

    rl = RunConfig(out="run").rl
    sizes = {"gold_judge_every", "iterations", "batch_size", "response_length"}
    rloo = RLOOJob(model="m", reward="r", prompts="p", out="o").model_dump(include=set(GRPOSettings.model_fields))
    for section, command in [(rl.grpo, GRPOSettings().model_dump()), (rl.rloo, rloo),
                             (rl.online_dpo, OnlineDPOSettings().model_dump())]:
        assert {k: v for k, v in section.model_dump().items() if k not in sizes} == {k: v for k, v in command.items() if k not in sizes}


def test_a_wrong_rl_method_is_refused_with_the_choices_named(tmp_path):
    refused(tmp_path, "out: o\nrl:\n  method: sac\n",
            r"bad.yaml: rl.method: Input should be 'ppo', 'grpo', 'rloo', 'online_dpo' or 'dpo'")
    refused(tmp_path, "out: o\nrl:\n  method: dpo\n  reward: judge\n", r"bad.yaml: rl: Value error, reward 'judge' is for the "
            r"online methods \(ppo, grpo, rloo, online_dpo\); dpo trains on the prefs stage's pairs")
    refused(tmp_path, "out: o\nrl:\n  online_dpo:\n    batch_size: 7\n", r"bad.yaml: rl.online_dpo: Value error, batch_size \(7\)")
    refused(tmp_path, "out: o\nrl:\n  grpo:\n    num_generation: 4\n", r"bad.yaml: rl.grpo.num_generation: Extra inputs")


@pytest.mark.slow
@pytest.mark.parametrize("method,section", [("grpo", "num_generations: 4"), ("online_dpo", "beta: 0.1")])
def test_an_online_rl_stage_trains_the_sft_model_and_its_metrics_feed_the_monitors_and_report(tmp_path, tiny_model_dir, method,
                                                                                              section):
    """The RL stage of `rl.method` on the tiny model (as the SFT model) against a rule reward (no judge): its folder
    holds the merged policy eval reads, its metrics.jsonl the histories the monitors read, and the report plots it."""
    import cai.pipeline as stages
    from cai.evaluate import training_history
    from cai.pipeline import Run
    from cai.report import write_report

    path = tmp_path / "c.yaml"
    path.write_text(f"out: {tmp_path / 'run'}\nrl:\n  method: {method}\n  reward: rule:share=e\n  {method}:\n    iterations: 2\n"
                    f"    batch_size: 8\n    response_length: 8\n    gold_judge_every: 0\n    {section}\n")
    run = Run(load_run_config(path), judge_url=None)
    (run.dir / "sft").mkdir(parents=True)
    (run.dir / "sft" / "merged").symlink_to(tiny_model_dir, target_is_directory=True)
    (run.dir / "prompts").mkdir()
    Path(run.prompt_file("rl")).write_text("".join(json.dumps({"prompt": f"Tell me about thing {i}."}) + "\n" for i in range(4)))
    summary = getattr(stages, method)(run)
    assert summary["iterations"] == 2 and run.final_policy == str(run.dir / method / "merged")
    assert (run.dir / method / "merged" / "config.json").exists()
    lengths, hacking = training_history(run.dir / method)
    assert [r["step"] for r in lengths] == [1, 2] and hacking == []  # no gold judge asked for
    assert json.loads((run.dir / method / "run.json").read_text())["reward"] == "rule:share=e"
    html = write_report(run.dir).read_text()
    title = {"grpo": "GRPO", "online_dpo": "Online DPO (AI feedback)"}[method]
    assert title in html and html.count(f'alt="{method} metrics"') >= 4  # the shared panels and the method's own
    assert "Latest samples" in html and "Tell me about thing" in html
