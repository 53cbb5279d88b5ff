"""Starting workers: the local launcher, built on torchrun's elastic agent."""

from pyddl.launch.config import LaunchError, RunConfig
from pyddl.launch.local import launch

__all__ = ["RunConfig", "launch", "LaunchError"]
