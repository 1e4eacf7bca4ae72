#!/usr/bin/env bash
# CI: install SLURM (slurmctld, slurmd, slurm-client, munge) before the tests, so that package
# installation is not counted in the test time. tests/test_slurm.py starts and stops the one-node
# cluster itself (launch/slurm/local_cluster.sh up/down) and, with CI=true, fails if it cannot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/slurm/local_cluster.sh install
