"""Run emae commands locally or as SLURM jobs (submitit): ``emae launch``.

Every compute stage goes through :func:`launch`: it runs an emae command line locally (default) or
submits it to SLURM with submitit, streams the job's logs, waits without ever hanging (also on
clusters without accounting), cancels the job when interrupted, and lets submitit requeue it on a
time-out or preemption (the command resumes from its own last checkpoint).

Imports are light (no torch, no submitit) until a job is submitted.
"""

from __future__ import annotations

from emae.launch.config import LauncherConfig, ResourceOverrides, Resources, load_launcher_config
from emae.launch.job import DEFAULT_ENTRY, EmaeCommand, call_entry
from emae.launch.runner import (LaunchError, Outcome, cancel, checkout_env, launch, local_command,
                                make_executor, precheck, run_local, submit, submitting, watch)
from emae.launch.signals import Interrupted, SignalGuard
from emae.launch.slurm import FINAL_STATES, GONE, JobState, job_state


__all__ = ["DEFAULT_ENTRY", "FINAL_STATES", "GONE", "EmaeCommand", "Interrupted", "JobState", "LaunchError",
           "LauncherConfig", "Outcome", "ResourceOverrides", "Resources", "SignalGuard", "call_entry", "cancel",
           "checkout_env", "job_state", "launch", "load_launcher_config", "local_command", "make_executor",
           "precheck", "run_local", "submit", "submitting", "watch"]
