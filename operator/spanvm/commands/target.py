"""Which cluster and namespace a command talks to, resolved as kubectl does: `--kubeconfig`,
else $KUBECONFIG (colon-separated files, merged), else ~/.kube/config, else the in-cluster
service account; `--context` or the current context; `-n`, else the context's namespace,
else the service account's, else `default`."""

import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from spanvm.commands.errors import CliError
from spanvm.kube import Kube

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_NAMESPACE = "default"
# What reading a kubeconfig raises: the client's own error, the file's (a directory, no
# permission), YAML that does not parse, and YAML of the wrong shape (a list, a number).
UNREADABLE = (ConfigException, OSError, yaml.YAMLError, TypeError, AttributeError, ValueError)


@dataclass(frozen=True)
class Target:
    """A connected client, the namespace to act in, and the server's address for messages."""

    kube: Kube
    namespace: str
    host: str


def _kubeconfig_files(kubeconfig: str | None) -> tuple[str, str] | None:
    """The kubeconfig to read (kubectl's order) and where it was named, for messages
    ("--kubeconfig", "$KUBECONFIG", "the default"), or None when there is none at all.
    Raises CliError naming the file when none of the named files exists."""
    if kubeconfig:
        if not Path(kubeconfig).expanduser().exists():
            raise CliError(f"kubeconfig {kubeconfig} (from --kubeconfig): no such file")
        return kubeconfig, "--kubeconfig"
    env = os.environ.get("KUBECONFIG")
    if env:
        if not any(Path(f).expanduser().exists() for f in env.split(os.pathsep) if f):
            raise CliError(f"kubeconfig {env} (from $KUBECONFIG): no such file")
        return env, "$KUBECONFIG"
    default = Path("~/.kube/config").expanduser()
    return (str(default), "the default") if default.exists() else None


def _reason(err: Exception) -> str:
    """One line: an OSError's strerror, the first line of a YAML error, else the message."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    if isinstance(err, yaml.YAMLError):
        return "not YAML: " + " ".join(str(err).split())
    if isinstance(err, (TypeError, AttributeError)):
        return "not a kubeconfig (expected a mapping with clusters, contexts and users)"
    return " ".join(str(err).split()) or type(err).__name__


def _context_namespace(files: str, source: str, context: str | None) -> str | None:
    """The namespace the chosen (or current) context names, if any."""
    try:
        contexts, current = config.list_kube_config_contexts(config_file=files)  # type: ignore[no-untyped-call]
    except UNREADABLE as err:
        raise CliError(f"kubeconfig {files} (from {source}): {_reason(err)}") from None
    if context is not None:
        chosen = next((c for c in contexts if c.get("name") == context), None)
        if chosen is None:
            known = ", ".join(sorted(str(c.get("name")) for c in contexts)) or "none"
            raise CliError(f'context "{context}" is not in the kubeconfig (contexts: {known})')
    else:
        chosen = current
    namespace = ((chosen or {}).get("context") or {}).get("namespace")
    return str(namespace) if namespace else None


def connect(kubeconfig: str | None, context: str | None, namespace: str | None) -> Target:
    """The client and namespace for these options (see the module docstring)."""
    configuration = client.Configuration()
    found = _kubeconfig_files(kubeconfig)
    in_cluster_namespace = None
    if found is not None:
        files, source = found
        context_namespace = _context_namespace(files, source, context)
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=files, context=context, client_configuration=configuration
            )
        except UNREADABLE as err:
            raise CliError(f"kubeconfig {files} (from {source}): {_reason(err)}") from None
    else:
        if context is not None:
            raise CliError(f"--context {context}: there is no kubeconfig to find it in")
        try:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except ConfigException:
            raise CliError(
                "no kubeconfig (set KUBECONFIG, use --kubeconfig, or create ~/.kube/config)"
                " and not running in a cluster"
            ) from None
        context_namespace = None
        if SERVICE_ACCOUNT_NAMESPACE.exists():
            in_cluster_namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    configuration.retries = 0  # one try: an unreachable server is said at once, in one line
    chosen = namespace or context_namespace or in_cluster_namespace or DEFAULT_NAMESPACE
    return Target(Kube(client.ApiClient(configuration)), chosen, str(configuration.host))
