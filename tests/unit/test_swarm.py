"""The Swarm phase's pure planning: manager group, advertise address, membership (join
decisions), label diff, roles, strangers, and the join request that carries the token."""

import json

import pytest

from operations import swarm as sw

H100 = {
    "gpus": [{"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559}] * 2,
    "driver": {"loaded_version": "580.95.05"},
}
FLEET = {"cluster_id": "c1", "manager": "gpu-01", "node_id": "m1", "addr": "10.20.0.11"}


def info(**kw):
    base = {"available": True, "error": None, "state": "inactive", "node_id": None,
            "node_addr": None, "is_manager": False, "cluster_id": None, "remote_managers": [],
            "primary_address": "10.20.0.14"}
    return {**base, **kw}


def node(id, name, role="worker", labels=None, reach=None, state="ready"):
    return {"id": id, "hostname": name, "role": role, "availability": "active",
            "labels": labels or {}, "state": state, "addr": "", "leader": False,
            "reachability": reach}


# --- Manager group -------------------------------------------------------------------------


@pytest.mark.parametrize("count, ok", [(1, True), (2, False), (3, True), (4, False), (5, True),
                                       (0, False), (7, False)])
def test_manager_count_must_be_1_3_or_5(count, ok):
    names = [f"gpu-{i}" for i in range(8)]
    problems = sw.manager_group_problems(names[:count], names)
    assert (problems == []) is ok


def test_managers_must_be_gpu_nodes_once_and_not_retiring():
    problems = sw.manager_group_problems(["a", "x", "a"], ["a", "b"], retiring={"a"})
    text = "; ".join(problems)
    assert "names a host twice" in text
    assert "not in gpu_nodes: x" in text
    assert "a: swarm_retire is set on a member of swarm_managers" in text


# --- Advertise address ---------------------------------------------------------------------


def test_advertise_address_key_then_ssh_ip_then_primary():
    assert sw.advertise_address("eth1", "10.0.0.5", "10.0.0.6") == "eth1"
    assert sw.advertise_address(None, "10.0.0.5", "10.0.0.6") == "10.0.0.5"
    assert sw.advertise_address(None, "gpu-01.example.net", "10.0.0.6") == "10.0.0.6"
    assert sw.advertise_address(None, None, None) is None


# --- Membership: what a host does --------------------------------------------------------


def test_membership_decisions():
    assert sw.membership(info(available=False), FLEET) == "unknown"
    assert sw.membership(info(), FLEET) == "absent"
    assert sw.membership(info(), None) == "absent"
    manager = info(state="active", is_manager=True, cluster_id="c1", node_id="m1")
    assert sw.membership(manager, FLEET) == "member"
    # A worker has no cluster ID: it is told by its managers' NodeIDs.
    worker = info(state="active", node_id="w1", remote_managers=["m1"])
    assert sw.membership(worker, FLEET) == "member"
    assert sw.membership(info(state="active", remote_managers=["zz"]), FLEET) == "other"
    assert sw.membership(info(state="active", is_manager=True, cluster_id="c2"), FLEET) == "other"
    # Before the fleet has a Swarm, any Swarm a host is in is another one.
    assert sw.membership(worker, None) == "other"
    assert sw.membership(info(state="pending"), FLEET) == "other"


# --- Labels ------------------------------------------------------------------------------


def test_gpu_labels_from_the_nvidia_fact():
    assert sw.gpu_labels(H100) == {
        "gpufleet.gpu.count": "2",
        "gpufleet.gpu.model": "NVIDIA H100 80GB HBM3",
        "gpufleet.gpu.memory-mib": "81559",
        "gpufleet.gpu.driver": "580.95.05",
    }
    mixed = {"gpus": [{"name": "B", "memory_mib": 40000}, {"name": "A", "memory_mib": 80000}],
             "driver": {"loaded_version": "580.95.05"}}
    assert sw.gpu_labels(mixed)["gpufleet.gpu.model"] == "A,B"
    assert sw.gpu_labels(mixed)["gpufleet.gpu.memory-mib"] == "40000"
    assert sw.gpu_labels({"gpus": [], "driver": {"loaded_version": None}}) == {
        "gpufleet.gpu.count": "0"
    }


def test_wanted_labels_record_the_inventory_keys():
    labels = sw.wanted_labels("gpu-01", H100, {"zone": "eu-1", "rack": "r1"})
    assert labels["gpufleet.host"] == "gpu-01"
    assert labels["zone"] == "eu-1"
    assert labels["gpufleet.labels"] == "rack,zone"
    assert "gpufleet.labels" not in sw.wanted_labels("gpu-01", H100, {})


def test_label_diff_changes_only_what_differs_and_never_foreign_labels():
    current = {"gpufleet.gpu.count": "8", "gpufleet.gpu.model": "old", "gpufleet.stale": "x",
               "operator.own": "keep", "zone": "eu-1", "gpufleet.labels": "zone"}
    wanted = {"gpufleet.gpu.count": "8", "gpufleet.gpu.model": "NVIDIA H100 80GB HBM3"}
    add, remove = sw.label_changes(current, wanted)
    assert add == {"gpufleet.gpu.model": "NVIDIA H100 80GB HBM3"}
    # zone was set from the inventory (recorded) and is gone from it: removed; operator.own kept.
    assert remove == ["gpufleet.labels", "gpufleet.stale", "zone"]
    assert sw.label_changes(wanted, wanted) == ({}, [])


def test_a_hand_set_label_with_an_inventory_key_is_kept_until_recorded():
    add, remove = sw.label_changes({"zone": "by-hand"}, {})
    assert (add, remove) == ({}, [])


# --- Nodes: finding, roles, strangers ------------------------------------------------------


def test_find_node_by_id_then_by_host_label():
    nodes = [node("n1", "a"), node("n2", "b", labels={"gpufleet.host": "gpu-02"})]
    assert sw.find_node(nodes, "gpu-01", "n1")["id"] == "n1"
    assert sw.find_node(nodes, "gpu-02", None)["id"] == "n2"
    assert sw.find_node(nodes, "gpu-03", None) is None


def test_roles_promote_first_and_never_demote_the_last_reachable_manager():
    nodes = [node("m1", "gpu-01", "manager", reach="reachable"), node("w2", "gpu-02")]
    promote, demote, refusals = sw.plan_roles(
        nodes, {"gpu-01": {"node_id": "m1", "manager": False},
                "gpu-02": {"node_id": "w2", "manager": True}})
    assert promote == [("gpu-02", "w2")] and demote == [("gpu-01", "m1")] and refusals == []
    alone = {"gpu-01": {"node_id": "m1", "manager": False}}
    promote, demote, refusals = sw.plan_roles(nodes, alone)
    assert promote == [] and demote == []
    assert refusals == ["gpu-01 is the last reachable manager: not demoted"]
    # An unreachable manager does not count as the one left.
    nodes = [node("m1", "gpu-01", "manager", reach="reachable"),
             node("m2", "gpu-02", "manager", reach="unreachable")]
    _, demote, refusals = sw.plan_roles(nodes, {"gpu-01": {"node_id": "m1", "manager": False}})
    assert demote == [] and refusals


def test_strangers_are_nodes_no_inventory_host_accounts_for():
    nodes = [node("n1", "a"), node("n2", "b", labels={"gpufleet.host": "gpu-02"}), node("n3", "c")]
    strangers = sw.unknown_nodes(nodes, {"n1"}, {"gpu-01", "gpu-02"})
    assert [n["id"] for n in strangers] == ["n3"]
    # A host that joined in a --limit run has no gpufleet.host label yet: its hostname counts.
    assert sw.unknown_nodes([node("n4", "gpu-04")], set(), {"gpu-04"}) == []


# --- Facts -------------------------------------------------------------------------------


def test_swarm_info_parse_survives_garbage():
    parsed = sw.parse_swarm_info(["primary=", "swarm=not json"])
    assert parsed["available"] is False and parsed["error"] == "not json"
    assert sw.parse_swarm_info([])["available"] is False
    assert sw.parse_swarm_nodes(["[]"]) == {"error": None, "nodes": []}
    assert sw.parse_swarm_nodes([])["error"]


# --- The join: the token only in the request body (stdin) ----------------------------------


def test_join_request_is_a_complete_http_request_with_the_token_in_its_body():
    request = sw.join_request("SWMTKN-1-secret", "10.20.0.14", "10.20.0.11:2377")
    head, _, body = request.partition("\r\n\r\n")
    assert head.startswith("POST /swarm/join HTTP/1.1\r\n")
    assert "SWMTKN" not in head
    assert f"Content-Length: {len(body.encode())}" in head
    assert body.endswith("\n")
    assert json.loads(body) == {
        "ListenAddr": "0.0.0.0:2377", "RemoteAddrs": ["10.20.0.11:2377"],
        "JoinToken": "SWMTKN-1-secret", "AdvertiseAddr": "10.20.0.14",
    }
    assert "AdvertiseAddr" not in sw.join_request("t", None, "r:2377")


def test_the_join_command_line_never_carries_the_token():
    assert "SWMTKN" not in sw.JOIN_SCRIPT and "$" in sw.JOIN_SCRIPT
    assert "dial-stdio" in sw.JOIN_SCRIPT


class _Output:
    def __init__(self, stdout="", stderr=""):
        self.stdout, self.stderr = stdout, stderr


class _Host:
    def __init__(self, name, info_=None, token="SWMTKN-1-secret"):
        self.name, self.connected, self.data = name, True, {"_sudo": True}
        self._info, self._token, self.commands = info_, token, []

    def get_fact(self, fact, **kwargs):
        return self._info

    def run_shell_command(self, command, **kwargs):
        self.commands.append((command.get_raw_value(), command.get_masked_value(), kwargs))
        if "join-token" in command.get_raw_value():
            return True, _Output(stdout=self._token + "\n")
        return True, _Output(stdout="joined the Swarm\n")

    def log_styled(self, *args, **kwargs):
        self.logged = args


class _Inventory:
    def __init__(self, hosts):
        self.hosts = {h.name: h for h in hosts}

    def get_host(self, name):
        return self.hosts.get(name)


class _State:
    def __init__(self, hosts):
        self.inventory = _Inventory(hosts)


def test_join_with_token_passes_the_token_on_stdin_only():
    manager = _Host("gpu-01", info(state="active", is_manager=True, node_addr="10.20.0.11",
                                   cluster_id="c1"))
    joining = _Host("gpu-04")
    assert sw.join_with_token(_State([manager, joining]), joining, "worker", "gpu-01", "10.20.0.14")
    (raw, masked, kwargs), = joining.commands
    assert "SWMTKN" not in raw and "SWMTKN" not in masked
    assert "SWMTKN-1-secret" in kwargs["_stdin"][0]
    assert kwargs["print_output"] is False and kwargs["print_input"] is False
    # The token read on the manager is not printed either.
    assert manager.commands[0][0].endswith("docker swarm join-token -q worker")
    assert manager.commands[0][2]["print_output"] is False


def test_join_fails_cleanly_when_the_manager_has_no_swarm():
    manager = _Host("gpu-01", info())
    joining = _Host("gpu-04")
    state = _State([manager, joining])
    assert sw.join_with_token(state, joining, "worker", "gpu-01", None) is False
    assert joining.commands == []
    assert "manages no Swarm" in joining.logged[0]


def test_reads_on_another_host_take_turns_so_sshd_never_sees_too_many_sessions():
    """Ten joining hosts reading the same manager at once: one session at a time on it."""
    import gevent

    class Manager:
        name, connected, data = "gpu-01", True, {"_sudo": True}
        open_now = most = 0

        def get_fact(self, fact, **kwargs):
            Manager.open_now += 1
            Manager.most = max(Manager.most, Manager.open_now)
            gevent.sleep(0.01)  # the SSH round trip: other greenlets run meanwhile
            Manager.open_now -= 1
            return info(state="active", is_manager=True)

        def run_shell_command(self, command, **kwargs):
            return self.get_fact(None), None

    manager = Manager()
    jobs = [gevent.spawn(sw._info, manager) for _ in range(10)]
    jobs += [gevent.spawn(sw._run_on, manager, sw.StringCommand("true")) for _ in range(10)]
    gevent.joinall(jobs, timeout=10)
    assert all(job.successful() for job in jobs)
    assert Manager.most == 1
