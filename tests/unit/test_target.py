import pytest

from hpc_serverless import Target
from hpc_serverless.core.errors import HPCServerlessError, TargetError
from hpc_serverless.core.target import format_hms, parse_mem_mib, parse_time_seconds


@pytest.mark.parametrize("value,mib", [
    (8, 8192), (0.5, 512), ("512M", 512), ("8G", 8192), ("8GB", 8192), ("8gib", 8192),
    ("1T", 1024**2), ("100K", 1), ("2", 2048), (" 4 G ", 4096),
])
def test_memory_units(value, mib):
    assert parse_mem_mib(value) == mib


@pytest.mark.parametrize("value", ["8X", "eight", "8 parsecs", -1, 0, True, [8], "", "-5G"])
def test_memory_errors_name_the_problem(value):
    with pytest.raises(TargetError) as e:
        parse_mem_mib(value)
    assert "mem" in str(e.value)


def test_unknown_memory_unit_lists_units():
    with pytest.raises(TargetError, match="unknown memory unit 'X'.*K, M, G or T"):
        Target.of({"mem": "8X"})


@pytest.mark.parametrize("value,seconds", [
    (30, 1800), (0.5, 30), ("30", 1800), ("01:30:00", 5400), ("1-00:00:00", 86400),
    ("2-01:02:03", 2 * 86400 + 3723), ("05:30", 330),
])
def test_time_units(value, seconds):
    assert parse_time_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "1:2:3:4", -3, 0, "00:00:00"])
def test_time_errors(value):
    with pytest.raises(TargetError, match="time"):
        parse_time_seconds(value)


def test_format_hms():
    assert format_hms(3723) == "01:02:03"
    assert format_hms(100 * 3600) == "100:00:00"


def test_unknown_key_lists_valid_keys():
    with pytest.raises(TargetError) as e:
        Target.of({"cpus": 2})
    msg = str(e.value)
    assert "'cpus'" in msg and "valid keys are" in msg and "cpu" in msg and "partition" in msg
    assert isinstance(e.value, HPCServerlessError) and isinstance(e.value, ValueError)


@pytest.mark.parametrize("bad", [{"cpu": -1}, {"cpu": 0}, {"cpu": 1.5}, {"cpu": "2"},
                                 {"cpu": True}, {"gpu": -1}, {"mpi": 0}, {"nodes": 2.5}])
def test_counts_must_be_whole_positive(bad):
    with pytest.raises(TargetError, match=list(bad)[0]):
        Target.of(bad)


def test_other_bad_values():
    with pytest.raises(TargetError, match="env"):
        Target.of({"env": {"1BAD": "x"}})
    with pytest.raises(TargetError, match="directives"):
        Target.of({"directives": ["ok", "two\nlines"]})
    with pytest.raises(TargetError, match="partition"):
        Target.of({"partition": "a\nb"})
    with pytest.raises(TargetError, match="same setting"):
        Target.of({"partition": "a", "queue": "b"})
    with pytest.raises(TargetError, match="dict or a Target"):
        Target.of(["cpu", 2])


def test_target_roundtrip_and_queue_alias():
    t = Target.of({"cpu": 2, "mem": "8G", "time": "01:00:00", "queue": "debug",
                   "env": {"A": 1}, "directives": "--exclusive"})
    assert t.partition == t.queue == "debug"
    assert t.env == {"A": "1"} and t.directives == ("--exclusive",)
    assert Target.of(t.as_dict()) == t
    assert Target.of(t) is t
    assert hash(t) == hash(Target.of(t.as_dict()))


def test_merged_over_defaults():
    defaults = Target.of({"partition": "debug", "time": 10, "cpu": 1, "env": {"A": "1"},
                          "directives": ["--x"]})
    t = Target.of({"cpu": 4, "env": {"B": "2"}}).merged_over(defaults)
    assert t.cpu == 4 and t.partition == "debug" and t.time_s == 600
    assert t.env == {"A": "1", "B": "2"} and t.directives == ("--x",)


@pytest.mark.parametrize("key,explicit,site", [("cpu", 1, 2), ("gpu", 0, 1), ("mpi", 1, 4),
                                                ("nodes", 1, 2), ("requeue", 0, 2)])
def test_explicit_value_equal_to_builtin_default_beats_site_default(key, explicit, site):
    """A task that says cpu=1 on a site whose defaults say cpu=2 gets 1 core (issue 17, item 1):
    'equal to the built-in default' is not 'not given'."""
    defaults = Target.of({key: site})
    field = {"cpu": "cpu", "gpu": "gpu", "mpi": "mpi", "nodes": "nodes", "requeue": "requeue"}[key]
    assert getattr(Target.of({key: explicit}).merged_over(defaults), field) == explicit
    assert getattr(Target.of({}).merged_over(defaults), field) == site       # not given: the site's
    assert getattr(Target().merged_over(defaults), field) == site


def test_given_keys_survive_as_dict_options_and_pickle():
    import pickle

    t = Target.of({"cpu": 1, "mem": "1G"})
    assert t.given == frozenset({"cpu", "mem_mib"})
    assert t.as_dict() == {"cpu": 1, "mem": "1024M"}          # cpu=1 is said, so it is kept
    assert Target.of(t.as_dict()) == t and Target.of({"mem": "1G"}) != t
    assert pickle.loads(pickle.dumps(t)).given == t.given
    merged = t.merged_over(Target.of({"cpu": 2, "time": 5}))
    assert merged.cpu == 1 and merged.time_s == 300 and merged.given == {"cpu", "mem_mib", "time_s"}
