"""The weights benchmark's arithmetic (scripts/bench_weights.py): the phase's report line read
back, ratios against one host, copies of the model, and the issue's targets judged honestly."""

from scripts import bench_weights as bench

LINE = ("    Model weights: hub bytes 1073742400 (1.0 GiB: synthetic-1024mib 1.0 GiB); LAN bytes "
        "1073742400 (node-1 1.0 GiB (8 files), node-2 0 B (0 files)); between hosts 2147484800 "
        "(node-1 1.0 GiB, node-2 1.0 GiB)\n")


def test_the_report_line_is_read_back_with_nested_parentheses():
    assert bench.parse_ledger("noise\n" + LINE) == {
        "ledger_hub_bytes": 1073742400, "control_bytes": 1073742400, "peer_bytes": 2147484800}
    star = "Model weights: hub bytes 0 (0 B); LAN bytes 3000 (a 1 KiB (1 files), b 2 KiB (1 files))"
    assert bench.parse_ledger(star)["peer_bytes"] == 0
    assert bench.parse_ledger("no such line") is None


def run(mode, hosts, wall, control, peer=0, hub=1000, ok=True):
    return {"mode": mode, "hosts": hosts, "wall_s": wall, "control_bytes": control,
            "peer_bytes": peer, "hub_bytes": hub, "ok": ok, "verified": hosts if ok else 0}


def test_ratios_are_against_the_same_modes_one_host_run_and_bytes_in_copies():
    rows = bench.summarise([run("peers", 1, 50, 1000), run("peers", 10, 60, 1000, 9000),
                            run("control", 1, 48, 1000), run("control", 10, 480, 10000)], 1000)
    by = {(r["mode"], r["hosts"]): r for r in rows}
    assert by["peers", 10]["vs_one_host"] == 1.2 and by["peers", 10]["peer_copies"] == 9.0
    assert by["control", 10]["vs_one_host"] == 10.0 and by["control", 10]["control_copies"] == 10.0
    lines = bench.verdicts(rows)
    assert lines[0].startswith("wall time at 10 hosts / one host: 1.2x") and lines[0].endswith("met")
    assert all("NOT" not in line for line in lines)


def test_a_missed_target_and_a_failed_run_are_said_as_they_are():
    rows = bench.summarise([run("peers", 1, 50, 1000), run("peers", 10, 100, 1200, 9000),
                            run("peers", 6, 0, 0, ok=False)], 1000)
    lines = bench.verdicts(rows)
    assert "2.0x" in lines[0] and lines[0].endswith("NOT met")
    assert "1.2 copies" in lines[1] and lines[1].endswith("NOT met")
    assert next(r for r in rows if r["hosts"] == 6)["vs_one_host"] is None
    assert bench.verdicts(bench.summarise([run("control", 1, 5, 1000)], 1000)) == [
        "no successful peers run: no target can be judged"]
