"""Settings of the control plane process: flags > env (BATON_CONTROLPLANE_*) > the --config YAML > defaults."""
from __future__ import annotations

import pathlib

from pydantic import Field, FilePath, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from baton.process_settings import ProcessSettings


class ControlPlaneSettings(ProcessSettings):
    model_config = SettingsConfigDict(env_prefix="BATON_CONTROLPLANE_")

    policy: FilePath = Field(description="autoscaling policy YAML (check it with `baton policy check`)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis with worker records and traffic signals")
    host: str = Field("127.0.0.1", description="bind address of the admin API")
    http_port: int = Field(8090, ge=0, le=65535, description="admin API HTTP port")
    grpc_port: int = Field(50070, ge=0, le=65535, description="admin API gRPC port")
    token: SecretStr | None = Field(None, description="bearer token of the admin API; prefer env "
                                                      "BATON_CONTROLPLANE_TOKEN, as argv is visible to other users")
    insecure: bool = Field(False, description="serve the admin API without a token")
    worker_log_dir: pathlib.Path | None = Field(None, description="where local-backend workers write their logs")
    keep_workers: bool = Field(False, description="leave local-backend workers running when the control plane "
                               "exits and adopt the registered ones on start (`baton up` stops them itself)")

    @model_validator(mode="after")
    def _token_or_insecure(self) -> ControlPlaneSettings:
        if not self.admin_token and not self.insecure:
            raise ValueError("the admin API needs a token: set BATON_CONTROLPLANE_TOKEN (or --token), "
                             "or pass --insecure to run it open")
        return self

    @property
    def admin_token(self) -> str | None:
        """The token; None when unset or empty (an empty env var is no token)."""
        if self.token is None:
            return None
        return self.token.get_secret_value() or None
