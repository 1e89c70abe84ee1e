"""A production fleet, as an example: copy to inventories/prod.py and edit.

    cp inventories/prod.example.py inventories/prod.py
    pyinfra inventories/prod.py deploy.py            # shows the changes, asks before applying
    pyinfra inventories/prod.py deploy.py --limit gpu-04   # onboard one new node

Groups are plain lists. A host is a name, or (name, data) where data overrides group_data for
that host. Keys and defaults: group_data/all.py and README.md ("Configuration keys").
"""

from operations.config import validate_inventory

# Every GPU server the deploy manages.
gpu_nodes = [
    # ssh_hostname: where pyinfra connects; ssh_user: a user with passwordless sudo.
    ("gpu-01", {"ssh_hostname": "10.20.0.11", "ssh_user": "ubuntu"}),
    ("gpu-02", {"ssh_hostname": "10.20.0.12", "ssh_user": "ubuntu"}),
    ("gpu-03", {"ssh_hostname": "10.20.0.13", "ssh_user": "ubuntu",
                # Labels of your own for placement, beside the gpufleet.gpu.* ones from the GPUs.
                "swarm_node_labels": {"rack": "r12"}}),
    # A host with a smaller disk than the fleet default asks for (models_dir itself, like every
    # key the stack reads, is the same on every host: set it in group_data, not here):
    (
        "gpu-04",
        {
            "ssh_hostname": "10.20.0.14",
            "ssh_user": "ubuntu",
            "preflight_min_free_gb_models": 60,
        },
    ),
]

# Hosts that manage the Swarm: 1, 3 or 5 members of gpu_nodes (the first one initialises it).
swarm_managers = ["gpu-01", "gpu-02", "gpu-03"]

# Refuse bad data (unknown keys, wrong types, impossible values) before any connection.
validate_inventory(globals())
