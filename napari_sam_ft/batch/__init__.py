"""Cohorts: segment, evaluate or apply an adapter over many scans on dask.distributed.

``run_cohort(scans, output_dir, CohortSettings(...))`` runs one task per scan on a LocalCluster of worker
processes or on an existing cluster (``scheduler="tcp://host:8786"``) and returns the results table; the
``napari-sam-ft batch`` command and the napari "Run on all scans" widget call it. See docs/batch.md.
"""

from .cohort import cohort_client, default_worker_count, run_cohort
from .scans import Scan, expand_inputs, read_manifest, with_scan_ids
from .settings import MODES, CohortSettings, ModelChoice

__all__ = ["MODES", "CohortSettings", "ModelChoice", "Scan", "cohort_client", "default_worker_count",
           "expand_inputs", "read_manifest", "run_cohort", "with_scan_ids"]
