"""Who receives from whom (operations/weights_peers.py): the chain's order and fallbacks, the files
it carries, the relay's address, the OpenSSH command line, and when a chain may close."""

from __future__ import annotations

import time

from operations import weights_chain
from operations import weights_peers as peers
from operations.weights_chain import Chain
from operations.weights_peers import Member, Registration

A, B, C = (Member(n, f"10.0.0.{i}", 7461) for i, n in enumerate("abc", start=1))
SEED = Member("s", "10.0.0.9", 7461)


def test_the_first_host_is_fed_by_the_control_machine_and_each_next_by_the_last_one():
    assert peers.upstreams_for([], None) == []
    assert peers.upstreams_for([A], None) == [A]
    # the last joined first (the chain), then back towards the head: a broken link is skipped
    assert peers.upstreams_for([A, B], None) == [B, A]


def test_with_a_seed_the_head_receives_from_it_and_everyone_falls_back_to_it_last():
    assert peers.upstreams_for([], SEED) == [SEED]
    assert peers.upstreams_for([A, B], SEED) == [B, A, SEED]


def test_hosts_lacking_the_same_files_share_a_chain_and_others_get_their_own():
    needs = {"h1": {"c", "a"}, "h2": {"a", "c"}, "h3": {"a"}, "h4": {"a", "c"}}
    assert peers.chains_by_need(needs) == {
        frozenset({"a", "c"}): ["h1", "h2", "h4"], frozenset({"a"}): ["h3"]}
    assert peers.chains_by_need({}) == {}


def test_a_chain_carries_its_files_in_listing_order():
    listing = [{"path": p, "size": s, "git_oid": "x"} for p, s in
               [("a", 1), ("b", 2), ("c", 3), ("d", 4)]]
    assert peers.chain_files(listing, frozenset({"c", "a"})) == [
        {"path": "a", "size": 1}, {"path": "c", "size": 3}]
    assert peers.chain_files(listing, frozenset()) == []


def test_the_relay_listens_on_the_cluster_address():
    assert peers.cluster_address("10.9.0.1", "10.0.0.1", "192.168.1.1") == "10.9.0.1"
    assert peers.cluster_address(None, "10.0.0.1", "192.168.1.1") == "10.0.0.1"
    assert peers.cluster_address(None, "gpu-01.example", "192.168.1.1") == "192.168.1.1"
    assert peers.cluster_address(None, "gpu-01.example", None) is None
    # swarm_advertise_address may name an interface, or carry Swarm's port
    addresses = {"lo": "127.0.0.1", "eth1": "10.9.0.7"}
    assert peers.cluster_address("eth1", "10.0.0.1", None, addresses) == "10.9.0.7"
    assert peers.cluster_address("eth1:2377", "10.0.0.1", None, addresses) == "10.9.0.7"
    assert peers.cluster_address("10.9.0.8:2377", None, None) == "10.9.0.8"
    assert peers.cluster_address("eth2", "10.0.0.1", None, addresses) is None


def test_openssh_reaches_the_host_as_the_inventory_says_and_carries_no_secret():
    data = {"ssh_hostname": "10.0.0.1", "ssh_user": "ops", "ssh_port": 2222,
            "ssh_key": "~/.ssh/fleet", "ssh_known_hosts_file": "/k/known_hosts",
            "ssh_strict_host_key_checking": "yes"}
    argv = peers.ssh_argv(data, "gpu-01", peers.relay_command())
    assert argv[0] == "ssh" and "BatchMode=yes" in argv
    assert argv[argv.index("-p") + 1] == "2222" and argv[argv.index("-l") + 1] == "ops"
    assert argv[argv.index("-i") + 1].endswith("/.ssh/fleet") and "~" not in argv[argv.index("-i") + 1]
    assert "UserKnownHostsFile=/k/known_hosts" in argv and "StrictHostKeyChecking=yes" in argv
    assert argv[-3:] == ["10.0.0.1", "--", f"python3 {peers.RELAY_PATH}"]
    # the inventory's name when no ssh_hostname; nothing else added
    assert peers.ssh_argv({}, "gpu-02", "x")[-3:] == ["gpu-02", "--", "x"]
    assert peers.ssh_data({"ssh_user": "ops", "ssh_password": "secret", "ssh_port": None}) == {
        "ssh_user": "ops"}


def _registration(name):
    return Registration(name, {}, f"10.0.0.{ord(name[-1]) % 50}", 7461, "/stage")


def _chain(needers, active=lambda n: True):
    return Chain(needers, [{"path": "a", "size": 1}], "sums", [], active=active)


def test_a_chain_closes_when_every_host_of_the_run_joined_and_has_its_bytes():
    chain = _chain(["h1", "h2"])
    chain.join(Member("h1", "10.0.0.1", 7461))
    chain.finish("h1", True)
    assert not chain._complete()  # h2 has not joined yet, and the late window is still open
    chain.join(Member("h2", "10.0.0.2", 7461))
    assert not chain._complete()  # h2 is receiving
    chain.finish("h2", False)     # a failed host counts as done: it must not hold the others
    assert chain._complete()


def test_a_host_that_left_the_run_is_not_waited_for_and_a_late_one_only_for_a_while():
    gone = _chain(["h1", "h2"], active=lambda n: n != "h2")
    gone.join(Member("h1", "10.0.0.1", 7461))
    gone.finish("h1", True)
    assert gone._complete()
    late = _chain(["h1", "h2"])
    late.join(Member("h1", "10.0.0.1", 7461))
    late.finish("h1", True)
    late.last_join = time.monotonic() - weights_chain.LATE_JOIN_S - 1
    assert late._complete()
    # a host whose relay never listened finished without joining: nobody waits for it
    never = _chain(["h1", "h2"])
    never.join(Member("h1", "10.0.0.1", 7461))
    never.finish("h1", True)
    never.finish("h2", False)
    assert never._complete()


def test_each_chain_has_its_own_token_and_the_header_carries_it_only_on_stdin():
    one, two = _chain(["h1"]), _chain(["h1"])
    assert one.token != two.token and len(one.token) == 64
    header = one.header("receive", "/stage", Member("h1", "10.0.0.1", 7461))
    assert header["token"] == one.token and header["listen"] == ["10.0.0.1", 7461]
    assert header["files"] == [{"path": "a", "size": 1}] and header["mode"] == "receive"


def test_registering_a_need_takes_precedence_over_holding():
    peers.reset()
    key = ("repo", "rev", "sel", "/opt/models", "m")
    peers.register_holder(key, _registration("h1"))
    peers.register_need(key, _registration("h1"))
    peers.register_holder(key, _registration("h1"))  # the same host planned again: still a needer
    entry = peers.model_entry(key)
    assert list(entry.needers) == ["h1"] and not entry.holders
    peers.reset()
