"""The data-plane token of an application: one per app, shared by its routers and expert replicas.

It lives in the application's environment, never in the app's config args: on Kubernetes the pods' env
from a Secret (`RAYMOE_DATA_PLANE_TOKEN`), else the app's runtime_env, where `apply` puts one when it
deploys a new app (the deployer's own `RAYMOE_DATA_PLANE_TOKEN`, or a fresh random one). The runtime_env is
the app's for its whole life: replicas that Serve restarts or adds get the same token, and a re-apply of
the same app keeps it (a new one would restart every replica). The app's builder reads it there and binds
it into the shard deployments (cluster.expert_plane); its Routers read it there too.
"""

import os
import secrets

TOKEN_ENV = "RAYMOE_DATA_PLANE_TOKEN"


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _env_vars(app: dict) -> dict:
    return (app.get("runtime_env") or {}).get("env_vars") or {}


def give_token(app: dict, deployed: dict | None) -> None:
    """Put a token in Serve app config `app` unless it names one: the one the app runs with now (`deployed`,
    its config as deployed, None for a new app); a new app the deployer's, else a fresh one. A deployed app
    whose config names none gets its token from its nodes' environment (a Kubernetes Secret): left alone."""
    if TOKEN_ENV in _env_vars(app):
        return
    if deployed is not None:
        token = _env_vars(deployed).get(TOKEN_ENV)
    else:
        token = os.environ.get(TOKEN_ENV) or new_token()
    if token:
        app.setdefault("runtime_env", {}).setdefault("env_vars", {})[TOKEN_ENV] = token


def env_token() -> str:
    """The token of the application this process runs in (a Router or the app's builder): its environment's."""
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise ValueError(f"{TOKEN_ENV} is not set: the expert plane will not serve without a data-plane token. "
                         "Deploy with `raymoe serve` (which makes one) or set it (from a Kubernetes Secret)")
    return token


def app_token(app: str) -> str:
    """The token of `app` for a router outside it (a driver): $RAYMOE_DATA_PLANE_TOKEN if set, else the one in
    the app's deployed config."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    from cluster.deploy import deployed_configs

    token = _env_vars(deployed_configs().get(app, {})).get(TOKEN_ENV)
    if not token:
        raise ValueError(f"no data-plane token for expert plane {app!r}: set {TOKEN_ENV} to the one it runs with")
    return token
