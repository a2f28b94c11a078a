"""The pod template every stage shares: image, sims argv, env, secrets, volumes, resources, placement, security."""

from __future__ import annotations

from kubernetes.client import (
    V1Capabilities,
    V1ConfigMapVolumeSource,
    V1Container,
    V1EmptyDirVolumeSource,
    V1EnvFromSource,
    V1EnvVar,
    V1LocalObjectReference,
    V1ObjectMeta,
    V1PersistentVolumeClaimVolumeSource,
    V1PodSecurityContext,
    V1PodSpec,
    V1PodTemplateSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecretEnvSource,
    V1SecurityContext,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from sims_platform.k8s.settings import DriverSettings, StageSettings

CONFIG_DIR = "/etc/sims"
PIPELINE_FILE = f"{CONFIG_DIR}/pipeline.yaml"
SETTINGS_FILE = f"{CONFIG_DIR}/driver.yaml"
USER_ID = 1000  # the Dockerfile's non-root user
GPU = "nvidia.com/gpu"


def stage_argv(step: str, iteration: int, count: int | None = None, loop: str | None = None) -> list[str]:
    """The `sims` argv a stage pod runs (what `sims stage --help` documents)."""
    argv = ["stage", step, "--config", PIPELINE_FILE, "--iteration", str(iteration)]
    if loop:
        argv += ["--loop", loop]
    if count is not None:  # an Indexed Job slice: the index comes from JOB_COMPLETION_INDEX
        argv += ["--count", str(count)]
    return argv


def _resources(st: StageSettings) -> V1ResourceRequirements:
    requests = {k: str(v) for k, v in st.resources.requests.items()}
    limits = {k: str(v) for k, v in st.resources.limits.items()}
    if st.gpus:  # Kueue counts requests; GPUs must be equal in both
        requests[GPU] = limits[GPU] = str(st.gpus)
    return V1ResourceRequirements(requests=requests or None, limits=limits or None)


def _env(settings: DriverSettings, labels: dict[str, str]) -> list[V1EnvVar]:
    env = {
        "SIMS_RUN": labels.get("sims.io/run", ""),
        "SIMS_ITERATION": labels.get("sims.io/iteration", ""),
        "SIMS_STAGE": labels.get("sims.io/step", ""),
        "PYTHONUNBUFFERED": "1",
        "HOME": "/home/sims",
    }
    if "sims.io/loop" in labels:
        env["SIMS_LOOP"] = labels["sims.io/loop"]
    if settings.mlflow_uri:
        env["MLFLOW_TRACKING_URI"] = settings.mlflow_uri
    env.update(settings.env)
    return [V1EnvVar(name=k, value=v) for k, v in env.items()]


def pod_template(settings: DriverSettings, st: StageSettings, *, container: str, command: list[str],
                 args: list[str], labels: dict[str, str], restart_policy: str | None,
                 mount_config: bool = True) -> V1PodTemplateSpec:
    """mount_config: False for pods that read no pipeline config (`sims prepare`), so they can run before the
    release's ConfigMap exists."""
    # The root filesystem is read-only: HOME (torch, huggingface and matplotlib caches) and /tmp (temporary files,
    # torch compile and elastic error files) are the only places a stage writes outside its storage.
    mounts = [V1VolumeMount(name="dshm", mount_path="/dev/shm"),
              V1VolumeMount(name="home", mount_path="/home/sims"),
              V1VolumeMount(name="tmp", mount_path="/tmp")]
    volumes = [V1Volume(name="dshm", empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=st.shm_size)),
               V1Volume(name="home", empty_dir=V1EmptyDirVolumeSource()),
               V1Volume(name="tmp", empty_dir=V1EmptyDirVolumeSource())]
    if mount_config:
        mounts.insert(0, V1VolumeMount(name="config", mount_path=CONFIG_DIR, read_only=True))
        volumes.insert(0, V1Volume(name="config", config_map=V1ConfigMapVolumeSource(name=settings.config_map)))
    if settings.data_claim:
        mounts.append(V1VolumeMount(name="data", mount_path=settings.data_mount_path))
        volumes.append(V1Volume(name="data", persistent_volume_claim=V1PersistentVolumeClaimVolumeSource(
            claim_name=settings.data_claim)))
    env_from = [V1EnvFromSource(secret_ref=V1SecretEnvSource(name=name))
                for name in (settings.s3_secret, settings.mlflow_auth_secret) if name] or None
    main = V1Container(
        name=container, image=settings.image, image_pull_policy=settings.image_pull_policy,
        command=command, args=args, env=_env(settings, labels), env_from=env_from,
        resources=_resources(st), volume_mounts=mounts,
        security_context=V1SecurityContext(allow_privilege_escalation=False, run_as_non_root=True,
                                           read_only_root_filesystem=True, capabilities=V1Capabilities(drop=["ALL"])))
    place = st.placement
    spec = V1PodSpec(
        containers=[main], volumes=volumes, restart_policy=restart_policy,
        service_account_name=settings.service_account, automount_service_account_token=False,
        priority_class_name=settings.priority_class,
        scheduler_name=settings.gang.scheduler_name if settings.gang.enabled else None,
        node_selector=place.node_selector or None,
        tolerations=[V1Toleration(**_snake(t)) for t in place.tolerations] or None,
        affinity=place.affinity or None,  # passed through as the user wrote it (camelCase keys)
        image_pull_secrets=[V1LocalObjectReference(name=n) for n in settings.image_pull_secrets] or None,
        security_context=V1PodSecurityContext(run_as_non_root=True, run_as_user=USER_ID, run_as_group=USER_ID,
                                              fs_group=USER_ID,
                                              seccomp_profile=V1SeccompProfile(type="RuntimeDefault")))
    return V1PodTemplateSpec(metadata=V1ObjectMeta(labels=labels), spec=spec)


def _snake(d: dict) -> dict:
    """Toleration keys as the model's arguments (tolerationSeconds -> toleration_seconds)."""
    out = {}
    for k, v in d.items():
        out["".join("_" + c.lower() if c.isupper() else c for c in k)] = v
    return out
