"""One process of the two-process CPU test: `python tests/distributed_worker.py PORT PID OUT [per_host]`."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # pylint: disable=wrong-import-position

port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)

from tests.train_fixtures import one_step_loss, per_host_step  # pylint: disable=wrong-import-position

if len(sys.argv) > 4 and sys.argv[4] == "per_host":
  loss, rows = per_host_step(shard=(pid, 2), data=4)
  with open(f"{out}.{pid}", "w") as f:
    f.write(repr((loss, rows)))
else:
  loss = one_step_loss(data=4)
  if pid == 0:
    with open(out, "w") as f:
      f.write(repr(loss))
jax.distributed.shutdown()
