import copy
from pathlib import Path

import pytest
import yaml
from folder_helpers import write_site_tree

from simfl.core.config import AlgorithmConfig, TrainingConfig
from simfl.core.errors import UserError
from simfl.engine.scenario import Scenario, apply_overrides, load_scenario, parse_scenario, scenario_to_yaml

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def minimal(**top):
    raw = {"populations": [{"name": "a", "clients": 4}]}
    raw.update(top)
    return raw


def with_pop(**pop):
    return {"populations": [{"name": "a", "clients": 4, **pop}]}


def error_of(raw, overrides=None) -> str:
    with pytest.raises(UserError) as info:
        parse_scenario(raw, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- valid input


def test_minimal_scenario_parses_with_defaults():
    sc = parse_scenario(minimal())
    assert isinstance(sc, Scenario)
    assert [p.name for p in sc.populations] == ["a"]
    assert sc.num_clients == 4
    assert sc.populations[0].label_skew.kind == "iid"
    assert sc.training.algorithm.kind == "fedavg"
    assert sc.data.name == "synthetic"
    assert sc.model.arch == "convnet"


def test_name_defaults_from_argument_but_file_name_wins():
    assert parse_scenario(minimal(), name="from_file").name == "from_file"
    assert parse_scenario(minimal(name="own"), name="from_file").name == "own"


def test_populations_are_required():
    msg = error_of({"name": "x"})
    assert "populations" in msg
    assert "required" in msg


def test_empty_population_list_rejected():
    assert "populations" in error_of({"populations": []})


def test_top_level_must_be_a_mapping():
    with pytest.raises(UserError):
        parse_scenario([1, 2])
    with pytest.raises(UserError):
        parse_scenario("populations")


def test_shorthands_expand():
    sc = parse_scenario(
        {
            "populations": [{"name": "a", "clients": 3, "label_skew": "iid"}],
            "training": {"algorithm": "fedavg", "optimizer": "adam"},
        }
    )
    assert sc.populations[0].label_skew.kind == "iid"
    assert sc.training.algorithm.kind == "fedavg"
    assert sc.training.optimizer.kind == "adam"


def test_dataset_name_is_case_insensitive():
    assert parse_scenario(minimal(data={"name": "PathMNIST", "size": 28})).data.name == "pathmnist"


def test_cohort_size():
    assert TrainingConfig(fraction=0.25).cohort_size(10) == 3  # ceil(2.5)
    assert TrainingConfig(fraction=0.01).cohort_size(10) == 1
    assert TrainingConfig(clients_per_round=4).cohort_size(10) == 4
    assert TrainingConfig(clients_per_round=40).cohort_size(10) == 10
    assert TrainingConfig().cohort_size(50) == 10


def test_attacks_are_off_by_default_and_sample_victims_and_rounds():
    assert parse_scenario(minimal()).attacks is None
    sc = parse_scenario(minimal(attacks={"methods": ["ig", {"kind": "dlg", "iterations": 7}], "every": 3}))
    assert [m.kind for m in sc.attacks.methods] == ["ig", "dlg"]
    assert sc.attacks.methods[0].knobs() == {"iterations": 4800, "lr": 0.1, "tv_weight": 0.1, "restarts": 1}
    assert sc.attacks.methods[1].knobs() == {"iterations": 7, "lr": 1.0}
    assert [r for r in range(1, 10) if sc.attacks.attacked(r)] == [3, 6, 9]
    assert sc.attacks.victim_count(10) == 1
    listed = parse_scenario(minimal(attacks={"rounds": [1, 4], "victim_fraction": 0.25}))
    assert [r for r in range(1, 10) if listed.attacks.attacked(r)] == [1, 4]
    assert listed.attacks.victim_count(10) == 3 and listed.attacks.victim_count(2) == 1
    assert parse_scenario(minimal(attacks={"victims": 4})).attacks.victim_count(3) == 3


def test_more_victims_than_the_cohort_is_refused():
    msg = error_of(minimal(attacks={"victims": 50}))
    assert msg.startswith("scenario: (top level): attacks.victims: 50 victims per round, but a round's cohort "
                          "has only 4 clients"), msg


def test_held_out_victims_need_a_held_out_population():
    assert parse_scenario(minimal(attacks={})).attacks.held_out_victims == 0
    raw = {"populations": [{"name": "a", "clients": 4}, {"name": "b", "clients": 3, "held_out": True}],
           "attacks": {"held_out_victims": 2}}
    assert parse_scenario(raw).attacks.held_out_victims == 2
    raw["populations"][1]["held_out"] = False
    msg = error_of(raw)
    assert msg.startswith("scenario: (top level): attacks.held_out_victims:"), msg
    # 0 (the default) needs no held-out population
    raw["attacks"]["held_out_victims"] = 0
    parse_scenario(raw)


def test_server_defaults_filled_in_for_adaptive():
    alg = AlgorithmConfig(kind="fedadam", server_lr=0.1)
    assert alg.server == {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}


# ---------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "raw, path, words",
    [
        (minimal(training={"rounds": "ten"}), "training.rounds", ["integer", "'ten'"]),
        (minimal(populaitons=[]), "populaitons", ["unknown key"]),
        (minimal(training={"lr_typo": 0.1}), "training.lr_typo", ["unknown key"]),
        (minimal(training={"optimizer": {"kind": "sgd", "lrr": 1}}), "training.optimizer.lrr", ["unknown key"]),
        (with_pop(label_skew={"kind": "dirichlet", "alpha": 0}), "populations.0.label_skew.alpha", ["greater than 0"]),
        (with_pop(label_skew={"kind": "dirichlet", "alpha": -1.5}), "populations.0.label_skew.alpha", ["-1.5"]),
        ({"populations": [{"name": "a", "clients": -3}]}, "populations.0.clients", ["greater than 0", "-3"]),
        (with_pop(label_skew={"kind": "dirichlet"}), "populations.0.label_skew", ["alpha"]),
        (with_pop(label_skew={"kind": "iid", "alpha": 0.5}), "populations.0.label_skew", ["alpha", "iid"]),
        (with_pop(label_skew={"kind": "shards"}), "populations.0.label_skew", ["classes"]),
        (with_pop(label_skew={"kind": "iid", "classes": 2}), "populations.0.label_skew", ["classes"]),
        (with_pop(quantity={"min": 10, "max": 5}), "populations.0.quantity", ["max", "min"]),
        (minimal(training={"algorithm": {"kind": "fedprox"}}), "training.algorithm", ["mu"]),
        (minimal(training={"algorithm": "fedprox"}), "training.algorithm", ["mu"]),
        (minimal(training={"algorithm": {"kind": "fedavg", "mu": 0.1}}), "training.algorithm", ["mu"]),
        (minimal(training={"algorithm": {"kind": "fedavg", "server_lr": 0.1}}), "training.algorithm", ["server_lr"]),
        (minimal(training={"clients_per_round": 3, "fraction": 0.5}), "training", ["clients_per_round", "fraction"]),
        (minimal(data={"name": "imagenet"}), "data.name", ["unknown dataset", "imagenet"]),
        (minimal(data={"name": "cifar10", "size": 28}), "data", ["size", "32"]),
        (minimal(data={"name": "pathmnist", "size": 32}), "data", ["size"]),
        (minimal(model={"arch": "resnet18", "norm": "none"}), "model", ["norm", "resnet18"]),
        (minimal(model={"arch": "vgg"}), "model.arch", []),
        (minimal(seed=-1), "seed", []),
        (minimal(attacks={"methods": [{"kind": "ig", "iterations": 0}]}), "attacks.methods.0.iterations", ["greater"]),
        (minimal(attacks={"methods": [{"kind": "dlg", "tv_weight": 0.1}]}), "attacks.methods.0.tv_weight",
         ["unknown key", "dlg"]),
        (minimal(attacks={"methods": ["ig", "ig"]}), "attacks", ["once"]),
        (minimal(attacks={"methods": []}), "attacks.methods", ["at least 1"]),
        (minimal(attacks={"methods": ["gradattack"]}), "attacks.methods.0.kind", ["'gradattack'"]),
        (minimal(attacks={"victims": 2, "victim_fraction": 0.5}), "attacks", ["victims", "victim_fraction"]),
        (minimal(attacks={"rounds": [1], "every": 2}), "attacks", ["rounds", "every"]),
        (minimal(attacks={"view": "update", "batch_size": 4}), "attacks", ["batch_size", "gradient"]),
        (minimal(attacks={"view": "update", "bn_stats": "batch"}), "attacks", ["bn_stats"]),
        (minimal(attacks={"pool": {"when_full": "later"}}), "attacks.pool.when_full", ["'wait' or 'drop'"]),
        (minimal(attacks={"view": "update"}, training={"optimizer": "adam"}), "(top level)", ["adam"]),
        (minimal(attacks={"rounds": [2, 9]}, training={"rounds": 5}), "(top level)", ["attacks.rounds", "9"]),
        (minimal(attacks={"bn_stats": "batch"}), "(top level)", ["model.norm: batch"]),
        (minimal(attacks={"held_out_victims": 2}), "(top level)", ["attacks.held_out_victims", "held_out: true"]),
        (minimal(attacks={"held_out_victims": -1}), "attacks.held_out_victims", ["greater than or equal to 0"]),
        (minimal(attacks={"held_out_victims": 1.5}), "attacks.held_out_victims", ["integer"]),
    ],
)
def test_malformed_gives_one_line_error_with_key_path(raw, path, words):
    msg = error_of(raw)
    assert msg.startswith(f"scenario: {path}:"), msg
    for word in words:
        assert word in msg, msg


def test_duplicate_population_names():
    raw = {"populations": [{"name": "a", "clients": 2}, {"name": "b", "clients": 2}, {"name": "a", "clients": 1}]}
    msg = error_of(raw)
    assert msg.startswith("scenario: populations:"), msg
    assert "unique" in msg and "a" in msg


def test_reserved_population_name_global():
    msg = error_of({"populations": [{"name": "global", "clients": 2}]})
    assert msg.startswith("scenario: populations:"), msg
    assert "global" in msg and "reserved" in msg


def test_all_populations_held_out():
    raw = {"populations": [{"name": "a", "clients": 2, "held_out": True},
                           {"name": "b", "clients": 2, "held_out": True}]}
    msg = error_of(raw)
    assert msg.startswith("scenario: populations:"), msg
    assert "held_out" in msg
    # one training population is enough
    raw["populations"][1]["held_out"] = False
    parse_scenario(raw)


def test_bad_population_name_characters():
    assert error_of({"populations": [{"name": "a b", "clients": 2}]}).startswith("scenario: populations.0.name:")


def test_many_errors_report_the_first_and_a_count():
    msg = error_of(minimal(training={"rounds": "ten", "batch_size": "big"}))
    assert "(+1 more)" in msg


# ---------------------------------------------------------------- overrides


def test_override_nested_path():
    raw = minimal(training={"rounds": 5})
    out = apply_overrides(raw, ["training.rounds=7", "training.optimizer.lr=0.5"])
    assert out["training"] == {"rounds": 7, "optimizer": {"lr": 0.5}}
    assert raw == minimal(training={"rounds": 5})  # input untouched


def test_override_list_index():
    raw = {"populations": [{"name": "a", "clients": 4}, {"name": "b", "clients": 4}]}
    sc = parse_scenario(raw, ["populations.0.clients=3"])
    assert [p.clients for p in sc.populations] == [3, 4]
    out = apply_overrides(raw, ["populations.1={name: c, clients: 9}"])
    assert out["populations"][1] == {"name": "c", "clients": 9}


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("[1,2]", [1, 2]), ("abc", "abc"), ("", None),
     ("a=b", "a=b")],
)
def test_override_values_are_yaml_typed(text, value):
    out = apply_overrides({}, [f"x.y={text}"])
    assert out == {"x": {"y": value}}
    assert type(out["x"]["y"]) is type(value)


def test_override_promotes_shorthand_string():
    raw = minimal(training={"algorithm": "fedprox"})
    out = apply_overrides(raw, ["training.algorithm.mu=0.1"])
    assert out["training"]["algorithm"] == {"kind": "fedprox", "mu": 0.1}
    sc = parse_scenario(raw, ["training.algorithm.mu=0.1"])
    assert sc.training.algorithm.kind == "fedprox"
    assert sc.training.algorithm.mu == 0.1


def test_overrides_apply_in_order():
    assert apply_overrides({}, ["a=1", "a=2"]) == {"a": 2}


def test_override_then_validation_error_names_path():
    msg = error_of(minimal(), ["training.rounds=0"])
    assert msg.startswith("scenario: training.rounds:")


@pytest.mark.parametrize(
    "override, words",
    [
        ("training.rounds", ["KEY.PATH=VALUE"]),
        ("=3", ["KEY.PATH=VALUE"]),
        ("populations.5.clients=3", ["populations.5", "list of 1"]),
        ("populations.x.clients=3", ["populations.x"]),
        ("populations.0.shift.color.0.x=1", ["populations.0.shift.color.0", "not a mapping"]),
        ("training.rounds.x=1", ["training.rounds", "not a mapping"]),
        ("training.rounds=[1, 2", ["training.rounds", "YAML"]),
    ],
)
def test_bad_overrides(override, words):
    raw = {
        "populations": [{"name": "a", "clients": 4, "shift": {"color": [1.0, 1.0, 1.0]}}],
        "training": {"rounds": 5},
    }
    before = copy.deepcopy(raw)
    with pytest.raises(UserError) as info:
        apply_overrides(raw, [override])
    msg = str(info.value)
    assert "\n" not in msg
    for word in words:
        assert word in msg, msg
    assert raw == before
    # parse_scenario surfaces the same error
    with pytest.raises(UserError):
        parse_scenario(raw, [override])


# ---------------------------------------------------------------- files


def test_load_scenario_from_file_with_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"rounds": 2})))
    sc = load_scenario(path, ["training.rounds=9"])
    assert sc.name == "mine"
    assert sc.training.rounds == 9


def test_load_scenario_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg


def test_load_scenario_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("populations:\n  - name: a\n    clients: [1, 2\n  - {oops\n")
    with pytest.raises(UserError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert str(path) in msg and "not valid YAML" in msg and "line" in msg


def test_load_scenario_non_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_scenario(path)


def test_load_scenario_invalid_content_is_one_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(minimal(training={"lr_typo": 1})))
    with pytest.raises(UserError) as info:
        load_scenario(path)
    assert str(info.value) == "scenario: training.lr_typo: unknown key"


def test_scenario_to_yaml_round_trips():
    raw = {
        "name": "rt",
        "seed": 11,
        "populations": [
            {"name": "a", "clients": 4, "label_skew": {"kind": "dirichlet", "alpha": 0.3}},
            {
                "name": "b",
                "clients": 2,
                "label_skew": "shards",
                "held_out": True,
                "shift": {"color": [1.1, 0.9, 1.0], "blur": 0.5},
            },
        ],
        "training": {"algorithm": {"kind": "fedyogi", "server_lr": 0.02}, "fraction": 0.5},
        "evaluation": {"local_clients": "all"},
        "resources": {"client_actors": 3},
    }
    raw["populations"][1]["label_skew"] = {"kind": "shards", "classes": 2}
    sc = parse_scenario(raw)
    text = scenario_to_yaml(sc)
    again = parse_scenario(yaml.safe_load(text))
    assert again == sc
    assert scenario_to_yaml(again) == text


def test_shipped_scenarios_validate(tmp_path):
    files = sorted(f for f in SCENARIOS.glob("*.yaml") if not f.name.startswith("study_"))  # studies: test_study
    assert {"smoke.yaml", "folder_sites.yaml"} <= {f.name for f in files}
    write_site_tree(tmp_path, patients_per_site=2, images_per_patient=1, size=8)  # folder_sites reads its sites
    for f in files:
        sc = load_scenario(f, [f"data.root={tmp_path}"] if f.name == "folder_sites.yaml" else [])
        assert sc.name
        assert parse_scenario(yaml.safe_load(scenario_to_yaml(sc))) == sc


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.local_steps=3", "training.local_epochs=2"], "training: set local_epochs or local_steps, not both"),
        (["model.arch=lenet", "model.width=8"], "model: width: only applies to arch: convnet"),
        (["training.optimizer.kind=adam", "training.optimizer.momentum=0.9"], "training.optimizer: momentum"),
        (["data.name=cifar10", "data.size=32", "data.synthetic.num_classes=4"], "data: synthetic: only applies"),
        (["populations.0.held_out='yes'"], "populations.0.held_out: Input should be a valid boolean"),
        (["training.rounds=true"], "training.rounds: Input should be a valid integer"),
        (["evaluation.local_clients=-3"], "evaluation.local_clients: Input should be greater than 0 (got -3)"),
        (["output.name=../escape"], "output.name: String should match pattern"),
    ],
)
def test_silently_ignored_or_mistyped_values_are_errors(overrides, message):
    base = {"populations": [{"name": "a", "clients": 2}]}
    with pytest.raises(UserError) as info:
        parse_scenario(base, overrides)
    assert message in str(info.value) and "(+" not in str(info.value), str(info.value)


# ---------------------------------------------------------------- defences and arms


def test_defence_shorthand_defaults_and_knobs():
    sc = parse_scenario(minimal(defence="dpsgd"))
    assert sc.defence.kind == "dpsgd"
    assert sc.defence.knobs() == {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "accountant": "rdp"}
    latent = parse_scenario(minimal(defence={"kind": "latent", "lam": 2.0})).defence
    assert latent.lam == 2.0 and latent.sigma_init == 0.1
    assert parse_scenario(minimal()).defence.kind == "none"


@pytest.mark.parametrize(
    ("defence", "key"),
    [
        ({"kind": "bido", "lam": 1.0}, "defence.lam: unknown key (not a setting of bido)"),
        ({"kind": "dpsgd", "noise_multiplier": -1}, "defence.noise_multiplier"),
        ({"kind": "dpsgd", "delta": 1.5}, "defence.delta"),
        ({"kind": "latent", "sigma_init": 2.0, "sigma_max": 1.0}, "sigma_init (2.0) must be below sigma_max"),
        ({"kind": "latent", "dual_lr": 0.1}, "dual_lr only applies with train_accuracy_target"),
        ({"kind": "laten"}, "defence.kind"),
    ],
)
def test_bad_defence_names_its_key(defence, key):
    assert key in error_of(minimal(defence=defence))


def test_dpsgd_with_batch_norm_statistics_for_the_attacker_is_an_error():
    assert parse_scenario(minimal(defence="dpsgd", model={"norm": "batch"})).model.norm == "batch"  # converted
    msg = error_of(minimal(defence="dpsgd", model={"norm": "batch"}, attacks={"bn_stats": "batch"}))
    assert "attacks.bn_stats: batch needs BatchNorm" in msg


def test_arms_resolve_to_one_scenario_each_with_the_patch_deep_merged():
    sc = parse_scenario(minimal(
        training={"rounds": 3, "batch_size": 8},
        arms={"plain": {}, "dp": {"defence": {"kind": "dpsgd", "noise_multiplier": 0.5}, "training": {"rounds": 4}}},
    ), name="cmp")
    arms = sc.arm_scenarios()
    assert list(arms) == ["plain", "dp"]
    assert arms["plain"].defence.kind == "none" and arms["plain"].name == "cmp.plain"
    assert arms["dp"].defence.noise_multiplier == 0.5
    assert arms["dp"].training.rounds == 4 and arms["dp"].training.batch_size == 8  # merged, not replaced
    assert all(a.arms is None for a in arms.values())
    assert parse_scenario(minimal()).arm_scenarios().keys() == {"scenario"}


@pytest.mark.parametrize(
    ("arms", "key"),
    [
        ({"dp": {"defence": {"kind": "dpsgd", "noise_multiplier": -1}}}, "arms.dp.defence.noise_multiplier"),
        ({"dp": {"trainin": {"rounds": 2}}}, "arms.dp.trainin: unknown key"),
        ({"dp": 3}, "arms.dp: Input should be a valid dictionary"),
        ({"dp": {"arms": {}}}, "arms.dp.arms: arms do not nest"),
        ({"bad name": {}}, "arm name 'bad name'"),
        ({}, "give at least one arm"),
    ],
)
def test_a_bad_arm_is_one_line_naming_its_key(arms, key):
    assert key in error_of(minimal(arms=arms))


def test_a_saved_scenario_holds_only_the_chosen_defences_knobs_and_reloads():
    sc = parse_scenario(minimal(defence={"kind": "dpsgd", "noise_multiplier": 0.5}, attacks={"methods": ["idlg"]}))
    saved = yaml.safe_load(scenario_to_yaml(sc))
    assert saved["defence"] == {"kind": "dpsgd", "noise_multiplier": 0.5, "max_grad_norm": 1.0, "delta": 1e-5,
                                "accountant": "rdp"}
    assert saved["attacks"]["methods"] == [{"kind": "idlg", "iterations": 300, "lr": 1.0}]
    assert parse_scenario(saved) == sc


def test_from_sites_reads_the_manifest_sites_and_holds_one_out(tmp_path):
    write_site_tree(tmp_path, patients_per_site=2, images_per_patient=1, size=8)
    sc = load_scenario(SCENARIOS / "folder_sites.yaml",
                       [f"data.root={tmp_path}", "populations.held_out=[hospital_c]"])
    assert [(p.name, p.site, p.held_out) for p in sc.populations] == [
        ("hospital_a", ["hospital_a"], False), ("hospital_b", ["hospital_b"], False),
        ("hospital_c", ["hospital_c"], True)]
    with pytest.raises(UserError, match=r"^scenario: populations\.held_out: give site names among: hospital_a, "):
        load_scenario(SCENARIOS / "folder_sites.yaml", [f"data.root={tmp_path}", "populations.held_out=[x]"])
