"""pyddl.sim: predict data-parallel scaling from a cost model of the cluster and the step.

`cost` prices collectives (alpha-beta-gamma per topology level), `step` models one training
step (bucketing in ready order, a one-at-a-time engine, exposed communication), `cluster`
reads cluster descriptions and `calibrate` fits them to `pyddl bench allreduce` output.
Pure Python apart from reading per-layer facts off a torch module.
"""

from pyddl.sim.cluster import Cluster, load_cluster, shipped_clusters
from pyddl.sim.cost import ALGORITHMS, Fabric, Level, allreduce_s, link_bound_s

__all__ = [
    "ALGORITHMS",
    "Cluster",
    "Fabric",
    "Level",
    "allreduce_s",
    "link_bound_s",
    "load_cluster",
    "shipped_clusters",
]
