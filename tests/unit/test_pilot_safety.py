"""Pilot mode's network exposure (issue 14): the dashboard stays on this host unless the site
asks, and a scheduler without TLS is reported every time one starts."""

from __future__ import annotations

import logging

from hpc_serverless.config.site import site_from_mapping
from hpc_serverless.engines.pilot import warn_insecure
from hpc_serverless.engines.pilot_cluster import pilot_cluster_kwargs


def _site(**pilot):
    return site_from_mapping({"scheduler": "slurm", "storage": "/tmp/hpcs-pilot-safety", "mode": "pilot",
                              "pilot": {"target": {"cpu": 2, "mem": "1G", "time": 10}, **pilot}},
                             source="/etc/sites/s.yaml", name="s")


def test_the_dashboard_listens_on_this_host_only_by_default():
    kw = pilot_cluster_kwargs(_site(), "/tmp/hpcs-pilot-safety/store")
    assert kw["scheduler_options"]["dashboard_address"].startswith("127.0.0.1:")


def test_a_site_may_open_the_dashboard():
    kw = pilot_cluster_kwargs(_site(scheduler_options={"dashboard_address": ":8787"}), "/tmp/x")
    assert kw["scheduler_options"]["dashboard_address"] == ":8787"


def test_no_tls_is_reported_on_every_start(caplog):
    site = _site(tls=False)
    with caplog.at_level(logging.WARNING, logger="hpc_serverless"):
        warn_insecure(site)
        warn_insecure(site)
    said = [r.getMessage() for r in caplog.records if "without TLS" in r.getMessage()]
    assert len(said) == 2 and "/etc/sites/s.yaml" in said[0] and "run code as you" in said[0]
