"""Reference rows (base, centralized, local-only), per-client held-out splits and personalized scores,
through the real engine on the tiny model."""
import pytest

from bench.config import build_config
from bench.engine import run_federated


def _run(tmp_path, shared_data, name, **over):
    cfg = build_config(preset="tiny", overrides={"data_root": str(shared_data), "client_test_fraction": 0.25,
                                                 "output_dir": str(tmp_path / name), "results_dir": str(tmp_path / "results"),
                                                 **over})
    return cfg, run_federated(cfg, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("refs")
    return {name: _run(tmp, shared_data, name, **over) for name, over in (
        ("flexlora", {"method": "flexlora"}), ("base", {"reference": "base"}),
        ("centralized", {"reference": "centralized"}), ("local-only", {"reference": "local-only"}))}


def test_every_row_shares_the_setting_and_the_held_out_examples(runs):
    settings = {name: rec["setting"] for name, (_, rec) in runs.items()}
    assert all(s == settings["flexlora"] for s in settings.values())  # a reference is a row of the same setting
    assert {rec["method"] for _, rec in runs.values()} == {"flexlora", "base", "centralized", "local-only"}
    tokens = {name: rec["test"]["tokens"] for name, (_, rec) in runs.items()}
    assert all(t == tokens["flexlora"] for t in tokens.values()) and len(tokens["flexlora"]) == 8
    for _, rec in runs.values():  # each client's own split: a quarter of its shard, out of its training data
        assert [c["test_examples"] for c in rec["clients"]] == [3, 3, 3]
        assert [c["num_examples"] for c in rec["clients"]] == [9, 9, 9]
        assert [p["client"] for p in rec["test"]["per_client"]] == [0, 1, 2]
        assert all(len(p["loss_sums"]) == 3 for p in rec["test"]["per_client"])


def test_base_trains_nothing_and_centralized_trains_the_same_total_steps_on_pooled_data(runs):
    _, base = runs["base"]
    assert base["rounds"] == [] and base["communication"] == {"bytes_up": 0, "bytes_down": 0}
    cfg, fed = runs["flexlora"]
    _, cen = runs["centralized"]
    fed_steps = sum(c["steps"] for r in fed["rounds"] for c in r["clients"])
    assert len(cen["rounds"]) == 1 and len(cen["rounds"][0]["clients"]) == 1
    only = cen["rounds"][0]["clients"][0]
    assert only["steps"] == fed_steps and only["rank"] == max(cfg.client_ranks()) and only["examples"] == 27
    # training moved it away from the base; the base row is the base model itself
    assert cen["test"]["loss"] != base["test"]["loss"]


def test_local_only_shares_nothing_and_scores_each_clients_own_model(runs):
    cfg, rec = runs["local-only"]
    assert all(c["bytes_up"] == 0 for r in rec["rounds"] for c in r["clients"])
    assert rec["method_info"]["personalized"] and rec["eval"] is None
    per = rec["personalized"]
    assert per["clients"] == 3 and [c["client"] for c in per["per_client"]] == [0, 1, 2]
    assert per["loss"] == sum(c["loss"] for c in per["per_client"]) / 3
    # the row's pooled figure is the mean over clients of each client's own model, example by example
    n = len(rec["test"]["loss_sums"])
    for i in range(n):
        assert rec["test"]["loss_sums"][i] == pytest.approx(per["pooled"]["loss_sums"][i])
    # every client's model differs from the base (it trained), and from the others (alone)
    losses = [c["loss"] for c in per["per_client_pooled"]]
    assert len(set(losses)) == 3 and all(l != runs["base"][1]["test"]["loss"] for l in losses)


def test_local_only_personal_state_survives_a_resume(tmp_path, shared_data):
    """Killed after round 1's checkpoint (SIGKILL-equivalent: the process state is dropped), resumed: the
    clients continue from their own factors, and the result equals an uninterrupted run."""
    import shutil

    _, ref = _run(tmp_path, shared_data, "ref", reference="local-only")
    cfg, _ = _run(tmp_path, shared_data, "cut", reference="local-only", rounds=1)
    run = tmp_path / "cut"
    # turn the finished 1-round run into a 2-round run interrupted after round 1: same checkpoint, same config
    import yaml
    conf = yaml.safe_load((run / "config.yaml").read_text())
    conf["rounds"] = 2
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    shutil.rmtree(run / "global_model")
    import json
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    meta["config_hash"] = build_config(config_file=str(run / "config.yaml")).config_hash()
    (run / "checkpoint" / "meta.json").write_text(json.dumps(meta))
    resumed = run_federated(build_config(config_file=str(run / "config.yaml"), overrides={"output_dir": str(run)}),
                            resume=str(run), log=lambda *a: None)
    assert resumed["personalized"]["pooled"]["loss_sums"] == ref["personalized"]["pooled"]["loss_sums"]


def test_alpha_policy_proportional_gives_every_client_the_same_scaling(tmp_path, shared_data):
    cfg, rec = _run(tmp_path, shared_data, "prop", method="flora", alpha_policy="proportional", alpha_ratio=2.0,
                    client_test_fraction=0.0)
    assert [c["scaling"] for c in rec["rounds"][0]["clients"]] == [2.0, 2.0, 2.0]
    assert rec["config"]["alpha_policy"] == "proportional"
    assert cfg.alpha_for(4) == 8.0 and cfg.alpha_for(2) == 4.0
