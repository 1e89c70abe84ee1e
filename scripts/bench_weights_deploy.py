"""The weights phase alone (deploy.py's step 6), for scripts/bench_weights.py:

    pyinfra --limit HOSTS inventories/lab.py scripts/bench_weights_deploy.py

The same @deploy the full run calls, with the same validated settings; nothing else runs.
"""

from pyinfra import host

from operations.config import settings_for
from operations.weights import model_weights

model_weights(settings_for(host))
