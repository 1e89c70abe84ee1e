"""The monitoring keys (monitoring_*), checked like every other key: part of
operations.config.Settings, which inherits them from this model. What each key means:
group_data/all.py and README.md, "Monitoring"."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

from operations.config_types import ControlPath, ImageRef, ServicePort

# Prometheus' duration for --storage.tsdb.retention.time: a number and one unit.
Retention = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,4}(h|d|w|y)$")]
Seconds = Annotated[int, Field(ge=5, le=3600)]


class MonitoringSettings(BaseModel):
    """Monitoring: exporters on the nodes, Prometheus, Alertmanager and Grafana on the first
    manager, the gateway's own exporter (operations/monitoring.py)."""

    monitoring_enabled: bool
    monitoring_node_exporter: bool
    monitoring_dcgm_exporter: bool
    monitoring_alertmanager: bool
    monitoring_grafana: bool
    monitoring_prometheus_image: ImageRef
    monitoring_alertmanager_image: ImageRef
    monitoring_node_exporter_image: ImageRef
    monitoring_dcgm_exporter_image: ImageRef
    monitoring_grafana_image: ImageRef
    monitoring_secret_uids: dict[Literal["alertmanager", "grafana"], Annotated[int, Field(ge=0, le=2**31)]]
    monitoring_prometheus_port: ServicePort
    monitoring_alertmanager_port: ServicePort
    monitoring_grafana_port: ServicePort
    monitoring_node_exporter_port: ServicePort
    monitoring_dcgm_exporter_port: ServicePort
    monitoring_gateway_metrics_port: ServicePort
    monitoring_scrape_interval_s: Annotated[int, Field(ge=5, le=300)]
    monitoring_retention: Retention
    monitoring_alert_for_s: Annotated[int, Field(ge=0, le=3600)]
    monitoring_alert_gpu_temperature_c: Annotated[int, Field(ge=40, le=110)]
    monitoring_alert_p95_latency_s: Annotated[float, Field(gt=0, le=3600)]
    monitoring_alert_p95_ttft_s: Annotated[float, Field(gt=0, le=3600)]
    monitoring_alert_disk_free_percent: Annotated[int, Field(ge=1, le=50)]
    monitoring_alert_receiver: Literal["webhook", "slack", "pagerduty"] | None
    monitoring_alert_receiver_file: ControlPath | None
    monitoring_grafana_admin_password_file: ControlPath | None
    monitoring_converge_timeout_s: Annotated[int, Field(ge=30, le=3600)]

    def monitoring_ports(self) -> dict[str, int]:
        """key -> port of every listener the monitoring pieces switched on open on the nodes."""
        ports = {"monitoring_prometheus_port": self.monitoring_prometheus_port,
                 "monitoring_gateway_metrics_port": self.monitoring_gateway_metrics_port}
        for piece, key in (("monitoring_alertmanager", "monitoring_alertmanager_port"),
                           ("monitoring_grafana", "monitoring_grafana_port"),
                           ("monitoring_node_exporter", "monitoring_node_exporter_port"),
                           ("monitoring_dcgm_exporter", "monitoring_dcgm_exporter_port")):
            if getattr(self, piece):
                ports[key] = getattr(self, key)
        return ports if self.monitoring_enabled else {}

    @model_validator(mode="after")
    def _monitoring_ports_free(self) -> "MonitoringSettings":
        """Every listener on the host network: no two on one port, none on a port the stack
        (gateway, engines, drain agents) or the weights relay uses."""
        taken = {self.stack_gateway_port: "stack_gateway_port",
                 self.weights_relay_port: "weights_relay_port"}
        if self.stack_gateway_http_redirect_port:
            taken[self.stack_gateway_http_redirect_port] = "stack_gateway_http_redirect_port"
        for spec in self.models:
            if spec.serve:
                taken[spec.port] = f"models[{spec.name}].port"
                if spec.agent_port:
                    taken[spec.agent_port] = f"models[{spec.name}] drain port"
        for key, port in self.monitoring_ports().items():
            if port in taken:
                raise PydanticCustomError(
                    "serving_clash", "expected a port nothing else on the nodes uses; {port} is "
                    "also {other}", {"key": key, "port": port, "other": taken[port]})
            taken[port] = key
        return self

    @model_validator(mode="after")
    def _monitoring_secrets_given(self) -> "MonitoringSettings":
        # The monitoring stack watches the inference stack: none without a served model.
        if not self.monitoring_enabled or not any(spec.serve for spec in self.models):
            return self
        if self.monitoring_grafana and not self.monitoring_grafana_admin_password_file:
            raise PydanticCustomError(
                "rule", "expected a file (0600) on the control machine holding Grafana's admin "
                "password, since models are served with monitoring_grafana on (or "
                "monitoring_grafana = False)",
                {"key": "monitoring_grafana_admin_password_file"})
        if self.monitoring_alert_receiver and not self.monitoring_alert_receiver_file:
            raise PydanticCustomError(
                "rule", "expected a file (0600) on the control machine holding the {kind} "
                "receiver's {what}, since monitoring_alert_receiver is {kind!r}",
                {"key": "monitoring_alert_receiver_file", "kind": self.monitoring_alert_receiver,
                 "what": RECEIVER_SECRET[self.monitoring_alert_receiver]})
        if self.monitoring_alert_receiver and not self.monitoring_alertmanager:
            raise PydanticCustomError(
                "rule", "expected None with monitoring_alertmanager = False: alerts reach a "
                "receiver through Alertmanager", {"key": "monitoring_alert_receiver"})
        return self


# What the file of each kind of receiver holds (one line, a Docker secret of Alertmanager's).
RECEIVER_SECRET = {"webhook": "URL", "slack": "incoming webhook URL",
                   "pagerduty": "Events API v2 routing key"}
