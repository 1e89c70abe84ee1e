"""Rolling fleet maintenance (scripts/rollout.py): plan, Swarm steps, report."""
