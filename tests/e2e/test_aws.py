"""playbooks/provision.yml and teardown.yml (role ec2_fleet) against a real moto_server over HTTP.

moto_server runs as a child process of this module on a free loopback port, with a Debian 12 image
catalogue of its own (MOTO_AMIS_PATH: two x86_64 images and a newer arm64 one, owner 136693071363, so
the default AMI lookup runs as on AWS). The playbooks get nothing but the standard AWS environment
(AWS_ENDPOINT_URL, dummy credentials, AWS_DEFAULT_REGION) and a temporary HOME with a generated
ed25519 key, exactly as a user's shell would give them. Everything is checked through boto3.

In order, on one moto: refusals (no env, bad env, bad count, no key, a KMS key that is not an ARN,
teardown unconfirmed: it names the account and region); provision env A and assert every resource and
rule (the balancer without an instance profile); a second run reports changed=0; model_servers 2 -> 3,
then a shrink refused while A's balancer is in the inventory but unreachable (nothing terminated), the
same shrink with -e ec2_fleet_drain_required=false, then 2 -> 1 drained in a real HAProxy (admin socket)
that the inventory names as A's balancer before termination; ansible-inventory -i inventory/aws groups,
the registry bucket inventory/aws gives the hosts and the controller (from the instances' mlpipe_bucket
tag) and the region in the trainers' job environment; env C in a VPC given by id, where a subnet, a key
pair and a bucket that are not C's are refused (nothing created), then C provisioned, a second public
key refused and then rotated with -e ec2_fleet_rotate_key=yes, and teardown leaves the user's VPC,
subnet and the other bucket; env B provisioned beside A with its own bucket name and
ec2_fleet_deploy_from_trainers (ec2:DescribeInstances for its trainers only), which inventory/aws finds
with no -e, shrunk without a balancer (lb count 0: nothing to drain); teardown of A (with the bucket)
leaves nothing tagged env=A and B untouched; teardown of B finds its bucket from the instances' tag.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from procs import free_port, stop, wait_port  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ENV_A, ENV_B, ENV_C = "awstest", "awsother", "awsgiven"
DEBIAN = "136693071363"
AMI_OLD, AMI_NEW, AMI_ARM = "ami-0deb12a0000000001", "ami-0deb12b0000000002", "ami-0deb12c0000000003"
ALIVE = ["pending", "running", "stopping", "stopped"]


def _ami(ami_id: str, name: str, arch: str, created: str) -> dict:
    return {"ami_id": ami_id, "state": "available", "public": True, "owner_id": DEBIAN,
            "image_location": f"debian/{name}", "root_device_type": "ebs", "root_device_name": "/dev/xvda",
            "description": name, "image_type": "machine", "platform": None, "architecture": arch, "name": name,
            "virtualization_type": "hvm", "hypervisor": "xen", "creation_date": created}


class Aws:
    """moto_server, the environment the playbooks run with, boto3 clients and helpers."""

    def __init__(self, tmp: Path, port: int):
        self.tmp, self.endpoint = tmp, f"http://127.0.0.1:{port}"
        self.home = tmp / "home"
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("AWS_", "ANSIBLE_", "MLPIPE_")) and k not in ("HOME", "PATH")}
        self.env.update({"HOME": str(self.home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}:/usr/sbin",
                         "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                         "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
                         "ANSIBLE_LOCAL_TEMP": str(tmp / "ansible-local")})
        self.log = tmp / "playbook.log"

    def client(self, service: str):
        import boto3
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def run(self, *args: str, env: dict | None = None, stdin=subprocess.DEVNULL, timeout: int = 600) -> subprocess.CompletedProcess:
        t = time.monotonic()
        r = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env={**self.env, **(env or {})}, stdin=stdin,
                           capture_output=True, text=True, timeout=timeout)
        with open(self.log, "a") as f:
            f.write(f"\n===== {' '.join(args)} (rc {r.returncode}, {time.monotonic() - t:.0f}s)\n{r.stdout}\n{r.stderr}\n")
        return r

    def playbook(self, name: str, *extra: str, **kw) -> subprocess.CompletedProcess:
        return self.run("ansible-playbook", f"playbooks/{name}", *extra, **kw)

    # ---------------------------------------------------------------- reading moto through boto3
    def instances(self, env: str, role: str | None = None, states=ALIVE) -> list[dict]:
        filters = [{"Name": "tag:project", "Values": ["mlpipe"]}, {"Name": "tag:env", "Values": [env]},
                   {"Name": "instance-state-name", "Values": states}]
        if role:
            filters.append({"Name": "tag:mlpipe_role", "Values": [role]})
        pages = self.client("ec2").describe_instances(Filters=filters)["Reservations"]
        return [i for r in pages for i in r["Instances"]]

    def tagged(self, env: str) -> dict:
        """Every resource tagged env=<env> (project mlpipe) that teardown must remove."""
        ec2, iam, s3 = self.client("ec2"), self.client("iam"), self.client("s3")
        f = [{"Name": "tag:project", "Values": ["mlpipe"]}, {"Name": "tag:env", "Values": [env]}]
        roles = [r["RoleName"] for r in iam.list_roles()["Roles"]
                 if {"Key": "env", "Value": env} in iam.list_role_tags(RoleName=r["RoleName"])["Tags"]]
        profiles = [p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
                    if {"Key": "env", "Value": env} in iam.get_instance_profile(
                        InstanceProfileName=p["InstanceProfileName"])["InstanceProfile"].get("Tags", [])]
        buckets = []
        for b in s3.list_buckets()["Buckets"]:
            try:
                tags = s3.get_bucket_tagging(Bucket=b["Name"])["TagSet"]
            except s3.exceptions.ClientError:
                tags = []
            if {"Key": "env", "Value": env} in tags:
                buckets.append(b["Name"])
        return {"instances": [i["InstanceId"] for i in self.instances(env)],
                "security_groups": [g["GroupId"] for g in ec2.describe_security_groups(Filters=f)["SecurityGroups"]],
                "vpcs": [v["VpcId"] for v in ec2.describe_vpcs(Filters=f)["Vpcs"]],
                "subnets": [s["SubnetId"] for s in ec2.describe_subnets(Filters=f)["Subnets"]],
                "internet_gateways": [g["InternetGatewayId"] for g in ec2.describe_internet_gateways(Filters=f)["InternetGateways"]],
                "route_tables": [t["RouteTableId"] for t in ec2.describe_route_tables(Filters=f)["RouteTables"]],
                "key_pairs": [k["KeyName"] for k in ec2.describe_key_pairs(Filters=f)["KeyPairs"]],
                "roles": roles, "instance_profiles": profiles, "buckets": buckets}


def changed(r: subprocess.CompletedProcess) -> int:
    return sum(int(m) for m in re.findall(r"\bchanged=(\d+)", r.stdout.split("PLAY RECAP")[-1]))


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return r.stdout


def tags(resource: dict) -> dict:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def newest_first(instances: list[dict]) -> list[dict]:
    """The role's documented removal order: newest launch time first, then the larger instance id."""
    return sorted(instances, key=lambda i: (i["LaunchTime"], i["InstanceId"]), reverse=True)


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    tmp = Path(tempfile.mkdtemp(prefix="mlpipe-aws-"))
    (tmp / "home" / ".ssh").mkdir(parents=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test", "-f", str(tmp / "home/.ssh/id_ed25519")], check=True)
    amis = tmp / "amis.json"
    amis.write_text(json.dumps([_ami(AMI_OLD, "debian-12-amd64-20240101-1000", "x86_64", "2024-01-01T10:00:00.000Z"),
                                _ami(AMI_NEW, "debian-12-amd64-20250601-2000", "x86_64", "2025-06-01T20:00:00.000Z"),
                                _ami(AMI_ARM, "debian-12-arm64-20250701-2000", "arm64", "2025-07-01T20:00:00.000Z")]))
    port = free_port()
    log = open(tmp / "moto.log", "wb")
    moto_env = {**os.environ, "MOTO_AMIS_PATH": str(amis)}
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=moto_env)
    a = Aws(tmp, port)
    a.procs = []
    try:
        wait_port("127.0.0.1", port, proc)
        yield a
    finally:
        for p in a.procs:
            stop(p)
        stop(proc)
        log.close()
        logs = tmp_path_factory.mktemp("aws")
        for f in (a.log, tmp / "moto.log", tmp / "haproxy.cfg"):
            if f.exists():
                shutil.copy(f, logs / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"playbook log: {logs / 'playbook.log'}")


# ------------------------------------------------------------------------------------ the tests
def test_bad_input_is_refused_with_a_clear_message(aws):
    r = aws.playbook("provision.yml")
    assert r.returncode != 0 and "-e env=NAME" in r.stdout + r.stderr
    r = aws.playbook("provision.yml", "-e", "env=Bad_Name")
    assert r.returncode != 0 and "Bad_Name" in r.stdout and "lowercase letters" in r.stdout
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", "-e", "ec2_fleet_model_servers_count=-1")
    assert r.returncode != 0 and "ec2_fleet_model_servers_count=-1" in r.stdout
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", "-e", "ec2_fleet_lb_count=2")
    assert r.returncode != 0 and "ec2_fleet_lb_count must be 0 or 1" in r.stdout
    empty = aws.tmp / "nohome"
    empty.mkdir()
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", env={"HOME": str(empty)})
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "no SSH public key" in out and "id_ed25519.pub" in out and "id_rsa.pub" in out, out[-3000:]
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", "-e", "ec2_fleet_public_key_file=/nonexistent/key.pub")
    assert r.returncode != 0 and "/nonexistent/key.pub" in r.stdout and "does not exist" in r.stdout
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", "-e", "ec2_fleet_bucket_encryption=aws:kms",
                     "-e", "ec2_fleet_bucket_kms_key_id=alias/registry")
    assert r.returncode != 0 and "is not a KMS key ARN" in " ".join(r.stdout.split()), r.stdout[-3000:]
    r = aws.playbook("teardown.yml", "-e", f"env={ENV_A}")  # no terminal (stdin /dev/null), no confirm=yes
    out = " ".join(r.stdout.split())
    account = aws.client("sts").get_caller_identity()["Account"]
    assert r.returncode != 0 and "Refusing" in out and "-e confirm=yes" in out, out[-3000:]
    assert f"in AWS account {account}" in out and "region us-east-1 without confirmation" in out, out[-3000:]
    # nothing was created by any of these
    assert not any(aws.tagged(ENV_A).values())


def test_provision_creates_every_resource_and_rule(aws):
    out = ok(aws.playbook("provision.yml", "-e", f"env={ENV_A}"))
    ec2, s3, iam = aws.client("ec2"), aws.client("s3"), aws.client("iam")
    account = aws.client("sts").get_caller_identity()["Account"]
    bucket = f"mlpipe-{ENV_A}-registry-{account}"
    want = {"project": "mlpipe", "env": ENV_A}

    vpc, = ec2.describe_vpcs(Filters=[{"Name": "tag:env", "Values": [ENV_A]}])["Vpcs"]
    assert vpc["CidrBlock"] == "10.42.0.0/16" and tags(vpc).items() >= want.items()
    subnet, = ec2.describe_subnets(Filters=[{"Name": "tag:env", "Values": [ENV_A]}])["Subnets"]
    assert subnet["VpcId"] == vpc["VpcId"] and subnet["CidrBlock"] == "10.42.1.0/24" and subnet["MapPublicIpOnLaunch"]
    igw, = ec2.describe_internet_gateways(Filters=[{"Name": "tag:env", "Values": [ENV_A]}])["InternetGateways"]
    assert igw["Attachments"][0]["VpcId"] == vpc["VpcId"]
    rtb, = ec2.describe_route_tables(Filters=[{"Name": "tag:env", "Values": [ENV_A]}])["RouteTables"]
    assert {"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": igw["InternetGatewayId"]}.items() <= \
        next(r for r in rtb["Routes"] if r.get("DestinationCidrBlock") == "0.0.0.0/0").items()
    assert [a["SubnetId"] for a in rtb["Associations"] if a.get("SubnetId")] == [subnet["SubnetId"]]

    sgs = {tags(g)["mlpipe_role"]: g for g in ec2.describe_security_groups(
        Filters=[{"Name": "tag:env", "Values": [ENV_A]}])["SecurityGroups"]}
    assert set(sgs) == {"lb", "model_servers", "trainers"}
    assert all(g["VpcId"] == vpc["VpcId"] and tags(g).items() >= want.items() for g in sgs.values())

    def ingress(g):  # {(port, source)}: every rule, CIDR or security group
        out = set()
        for p in g["IpPermissions"]:
            assert p["IpProtocol"] == "tcp" and p["FromPort"] == p["ToPort"], p
            out |= {(p["FromPort"], c["CidrIp"]) for c in p.get("IpRanges", [])}
            out |= {(p["FromPort"], u["GroupId"]) for u in p.get("UserIdGroupPairs", [])}
            assert not p.get("Ipv6Ranges") and not p.get("PrefixListIds"), p
        return out
    admin = "10.42.0.0/16"  # ec2_fleet_admin_cidrs empty: SSH from inside the VPC only
    assert ingress(sgs["lb"]) == {(8080, "0.0.0.0/0"), (22, admin)}
    assert ingress(sgs["model_servers"]) == {(8000, sgs["lb"]["GroupId"]), (22, admin)}  # the SG-to-SG rule
    assert ingress(sgs["trainers"]) == {(22, admin)}

    key, = ec2.describe_key_pairs(KeyNames=[f"mlpipe-{ENV_A}"])["KeyPairs"]
    assert tags(key).items() >= want.items()

    counts = {"lb": 1, "model_servers": 2, "trainers": 1}
    types = {"lb": "t3.small", "model_servers": "t3.medium", "trainers": "t3.large"}
    profiles = {"lb": None, "model_servers": "read", "trainers": "write"}  # the balancer needs no AWS access
    for role, n in counts.items():
        got = aws.instances(ENV_A, role)
        assert len(got) == n, (role, got)
        for i in got:
            t = tags(i)
            assert t.items() >= {**want, "mlpipe_role": role, "Name": f"mlpipe-{ENV_A}-{role.replace('_', '-')}",
                                 "mlpipe_bucket": bucket}.items(), t
            assert i["InstanceType"] == types[role] and i["ImageId"] == AMI_NEW  # newest x86_64 Debian 12
            assert i["KeyName"] == f"mlpipe-{ENV_A}" and i["SubnetId"] == subnet["SubnetId"]
            assert [g["GroupId"] for g in i["SecurityGroups"]] == [sgs[role]["GroupId"]]
            if profiles[role]:
                assert i["IamInstanceProfile"]["Arn"].endswith(f"/mlpipe/{ENV_A}/mlpipe-{ENV_A}-registry-{profiles[role]}")
            else:
                assert "IamInstanceProfile" not in i, i

    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    rule, = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    assert s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"] == {
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True}
    assert {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=bucket)["TagSet"]}.items() >= want.items()

    arn = f"arn:aws:s3:::{bucket}"
    for level in ("read", "write"):
        name = f"mlpipe-{ENV_A}-registry-{level}"
        prof = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in prof["Roles"]] == [name] and prof["Path"] == f"/mlpipe/{ENV_A}/"
        role = iam.get_role(RoleName=name)["Role"]
        assert {t["Key"]: t["Value"] for t in role["Tags"]}.items() >= want.items()
        trust = role["AssumeRolePolicyDocument"]
        trust = json.loads(trust) if isinstance(trust, str) else trust
        assert trust["Statement"] == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
        assert iam.list_role_policies(RoleName=name)["PolicyNames"] == [f"registry-{level}"]
        assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        doc = iam.get_role_policy(RoleName=name, PolicyName=f"registry-{level}")["PolicyDocument"]
        doc = json.loads(doc) if isinstance(doc, str) else doc
        grants = {(a, s["Resource"]) for s in doc["Statement"] for a in s["Action"]}
        assert all(s["Effect"] == "Allow" for s in doc["Statement"])
        read = {("s3:ListBucket", arn), ("s3:GetBucketLocation", arn), ("s3:GetObject", arn + "/*"),
                ("s3:GetObjectVersion", arn + "/*")}
        write = {("s3:PutObject", arn + "/*"), ("s3:DeleteObject", arn + "/*"), ("s3:AbortMultipartUpload", arn + "/*")}
        assert grants == (read if level == "read" else read | write), grants

    assert f"registry bucket s3://{bucket}" in out and "next: ansible-inventory -i inventory/aws --graph" in out


def test_second_run_changes_nothing(aws):
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}")
    ok(r)
    assert changed(r) == 0, r.stdout[-5000:]


def _haproxy(aws, servers: list[str]) -> Path:
    """A real HAProxy with backend mlpipe (servers named as inventory/aws names hosts: their instance
    id) and an admin socket; returns the socket."""
    sock = aws.tmp / "haproxy.sock"
    cfg = aws.tmp / "haproxy.cfg"
    cfg.write_text("\n".join([
        "global", f"    stats socket {sock} mode 600 level admin",
        "defaults", "    mode http", "    timeout connect 1s", "    timeout client 5s", "    timeout server 5s",
        "frontend fe", f"    bind 127.0.0.1:{free_port()}", "    default_backend mlpipe",
        "backend mlpipe", *[f"    server {s} 127.0.0.1:{free_port()}" for s in servers], ""]))
    haproxy = shutil.which("haproxy", path="/usr/sbin:/usr/bin:/usr/local/sbin") or pytest.fail("haproxy is not installed (make test installs it)")
    p = subprocess.Popen([haproxy, "-f", str(cfg), "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    aws.procs.append(p)
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, "haproxy did not start"
        time.sleep(0.05)
    return sock


def _admin_states(sock: Path) -> dict:
    """server name -> HAProxy admin state (0 ready, 1 maintenance set through the socket)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"show servers state mlpipe\n")
        text = s.makefile().read()
    rows = [line.split() for line in text.splitlines()[1:] if line.strip() and not line.startswith("#")]
    return {r[3]: int(r[6]) for r in rows}


def test_grow_then_shrink_drains_and_terminates_the_newest(aws):
    before = {i["InstanceId"] for i in aws.instances(ENV_A, "model_servers")}
    r = aws.playbook("provision.yml", "-e", f"env={ENV_A}", "-e", "ec2_fleet_model_servers_count=3")
    ok(r)
    now = aws.instances(ENV_A, "model_servers")
    assert len(now) == 3 and before < {i["InstanceId"] for i in now}  # the two stay, one is added
    others = {role: {i["InstanceId"] for i in aws.instances(ENV_A, role)} for role in ("lb", "trainers")}

    # A's balancer in the inventory but unreachable (the controller outside the VPC): the shrink is
    # refused before anything is terminated, and says what to do
    lb, = aws.instances(ENV_A, "lb", ["running"])
    far = aws.tmp / "far-balancer.yml"
    far.write_text(json.dumps({"all": {"children": {"load_balancers": {"hosts": {"balancer": {
        "ansible_connection": "ssh", "ansible_host": "127.0.0.1", "ansible_port": free_port(), "ansible_user": "nobody",
        "ec2_instance_id": lb["InstanceId"], "load_balancer_socket": "/run/haproxy.sock"}}}}}}))
    order = newest_first(now)
    r = aws.playbook("provision.yml", "-i", str(far), "-e", f"env={ENV_A}", "-e", "ec2_fleet_model_servers_count=2",
                     "-e", "ec2_fleet_drain_grace=0")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and f"not terminating {order[0]['InstanceId']}" in out and "nothing was terminated" in out, out[-3000:]
    assert "the balancer balancer does not answer" in out and "ec2_fleet_drain_required=false" in out and "bastion" in out, out[-3000:]
    assert {i["InstanceId"] for i in aws.instances(ENV_A, "model_servers", ["running"])} == {i["InstanceId"] for i in now}
    # the override terminates the newest undrained, and says so
    r = aws.playbook("provision.yml", "-i", str(far), "-e", f"env={ENV_A}", "-e", "ec2_fleet_model_servers_count=2",
                     "-e", "ec2_fleet_drain_grace=0", "-e", "ec2_fleet_drain_required=false")
    out = " ".join(ok(r).split())
    assert f"Not draining {order[0]['InstanceId']} before termination (ec2_fleet_drain_required=false)" in out, out[-3000:]
    assert {i["InstanceId"] for i in aws.instances(ENV_A, "model_servers", ALIVE)} == {i["InstanceId"] for i in order[1:]}
    undrained = order[0]["InstanceId"]
    now = aws.instances(ENV_A, "model_servers", ["running"])

    # A's balancer as the inventory gives it (inventory/aws gives ec2_instance_id and, through group_vars,
    # load_balancer_socket): here a local host in front of a real HAProxy
    sock = _haproxy(aws, [i["InstanceId"] for i in now])
    inv = aws.tmp / "balancer.yml"
    inv.write_text(json.dumps({"all": {"children": {"load_balancers": {"hosts": {"balancer": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "ec2_instance_id": lb["InstanceId"], "load_balancer_socket": str(sock)}}}}}}))
    order = newest_first(now)
    gone, kept = order[:1], order[1:]
    r = aws.playbook("provision.yml", "-i", str(inv), "-e", f"env={ENV_A}", "-e", "ec2_fleet_model_servers_count=1",
                     "-e", "ec2_fleet_drain_grace=0")
    out = " ".join(ok(r).split())
    assert [i["InstanceId"] for i in aws.instances(ENV_A, "model_servers", ["running"])] == [kept[0]["InstanceId"]]
    terminated = {i["InstanceId"]: i["State"]["Name"] for i in aws.instances(ENV_A, "model_servers", ["shutting-down", "terminated"])}
    assert set(terminated) == {undrained} | {i["InstanceId"] for i in gone}, terminated
    states = _admin_states(sock)
    assert states == {**{i["InstanceId"]: 1 for i in gone}, kept[0]["InstanceId"]: 0}
    assert "terminated from model_servers" in out and "rewrites HAProxy without the terminated model servers" in out
    # the other groups kept running untouched
    assert others == {role: {i["InstanceId"] for i in aws.instances(ENV_A, role, ["running"])} for role in ("lb", "trainers")}



def test_inventory_groups_the_hosts(aws):
    r = aws.run("ansible-inventory", "-i", "inventory/aws", "--list", "-e", f"env={ENV_A}")
    inv = json.loads(ok(r))
    want = {"load_balancers": "lb", "model_servers": "model_servers", "trainers": "trainers"}
    for group, role in want.items():
        hosts = set(inv.get(group, {}).get("hosts", []))
        assert hosts == {i["InstanceId"] for i in aws.instances(ENV_A, role, ["running"])}, (group, inv.get(group))
        # named by instance id, reached on the private address
        reached = [inv["_meta"]["hostvars"][h]["ansible_host"] for h in hosts]
        reached = {v.get("__ansible_unsafe", str(v)) if isinstance(v, dict) else v for v in reached}  # --list marks unsafe text
        assert reached == {i["PrivateIpAddress"] for i in aws.instances(ENV_A, role, ["running"])}, reached
    graph = ok(aws.run("ansible-inventory", "-i", "inventory/aws", "--graph", "-e", f"env={ENV_A}"))
    for group in want:
        assert f"@{group}:" in graph
    account = aws.client("sts").get_caller_identity()["Account"]
    hosts = {i["InstanceId"] for role in want.values() for i in aws.instances(ENV_A, role, ["running"])}
    assert registries(aws, ENV_A) == {**{h: f"s3://mlpipe-{ENV_A}-registry-{account}/" for h in hosts},
                                      "localhost": f"s3://mlpipe-{ENV_A}-registry-{account}/"}
    # the trainers' retrain jobs (and the deploys they run) look in the env's region, not boto3's us-east-1 default
    trainer, = aws.instances(ENV_A, "trainers", ["running"])
    region = trainer["Placement"]["AvailabilityZone"][:-1]
    out = ok(aws.run("ansible", "-i", "inventory/aws", "trainers", "-e", f"env={ENV_A}", "-e", "retrain_cron_project_dir=/srv/x",
                     "-m", "ansible.builtin.debug", "-a", "var=retrain_cron_environment"))
    assert re.search(rf"^\s+AWS_REGION: {region}$", out, re.M) and re.search(rf"^\s+AWS_DEFAULT_REGION: {region}$", out, re.M), out


def _keygen(aws, name: str) -> Path:
    key = aws.tmp / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key.with_suffix(".pub")


def test_what_is_not_the_envs_is_refused_and_never_deleted(aws):
    """Env C in a VPC the user gives by id: a same-CIDR subnet, a same-named key pair and a bucket of
    another env are refused (nothing created or retagged), C's own resources are made beside them, a
    second public key is refused until -e ec2_fleet_rotate_key=yes, and teardown leaves the user's."""
    ec2, s3 = aws.client("ec2"), aws.client("s3")
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    theirs = ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.1.0/24", TagSpecifications=[
        {"ResourceType": "subnet", "Tags": [{"Key": "Name", "Value": "theirs"}]}])["Subnet"]["SubnetId"]
    stray = _keygen(aws, "stray_ed25519")
    ec2.import_key_pair(KeyName=f"mlpipe-{ENV_C}", PublicKeyMaterial=stray.read_bytes())  # untagged: not C's
    other_bucket = "mlpipe-someone-elses-registry"
    s3.create_bucket(Bucket=other_bucket)
    s3.put_bucket_tagging(Bucket=other_bucket, Tagging={"TagSet": [{"Key": "project", "Value": "mlpipe"},
                                                                   {"Key": "env", "Value": "someone"}]})
    given = ("-e", f"env={ENV_C}", "-e", f"ec2_fleet_vpc_id={vpc}", "-e", "ec2_fleet_lb_count=0",
             "-e", "ec2_fleet_model_servers_count=0", "-e", "ec2_fleet_trainers_count=0")

    r = aws.playbook("provision.yml", *given, "-e", "ec2_fleet_subnet_cidr=10.77.1.0/24", "-e", f"ec2_fleet_bucket={other_bucket}")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "nothing was created or changed" in out, out[-4000:]
    assert f"subnet {theirs}" in out and f"-e ec2_fleet_subnet_id={theirs} to use it as it is" in out, out[-4000:]
    assert "another -e ec2_fleet_subnet_cidr" in out, out[-4000:]
    assert f"key pair mlpipe-{ENV_C} already exists" in out and "neither replaced nor adopted" in out, out[-4000:]
    assert f"bucket {other_bucket} already exists and is not tagged project=mlpipe env={ENV_C}" in out, out[-4000:]
    assert not any(aws.tagged(ENV_C).values()), aws.tagged(ENV_C)
    assert tags(ec2.describe_subnets(SubnetIds=[theirs])["Subnets"][0]) == {"Name": "theirs"}
    stray_key, = ec2.describe_key_pairs(KeyNames=[f"mlpipe-{ENV_C}"])["KeyPairs"]
    assert not stray_key.get("Tags")
    assert {t["Key"]: t["Value"] for t in s3.get_bucket_tagging(Bucket=other_bucket)["TagSet"]}["env"] == "someone"

    ec2.delete_key_pair(KeyName=f"mlpipe-{ENV_C}")  # the user removes the stray key pair
    mine = ("-e", "ec2_fleet_subnet_cidr=10.77.2.0/24")
    ok(aws.playbook("provision.yml", *given, *mine))
    subnet, = ec2.describe_subnets(Filters=[{"Name": "tag:env", "Values": [ENV_C]}])["Subnets"]
    assert subnet["VpcId"] == vpc and subnet["CidrBlock"] == "10.77.2.0/24"
    key, = ec2.describe_key_pairs(KeyNames=[f"mlpipe-{ENV_C}"])["KeyPairs"]

    # another operator's (or an old) public key: refused, the key pair stays as it is
    before = aws.tagged(ENV_C)
    r = aws.playbook("provision.yml", *given, *mine, "-e", f"ec2_fleet_public_key_file={stray}")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and f"key pair mlpipe-{ENV_C} exists with fingerprint {key['KeyFingerprint']}" in out, out[-4000:]
    assert "-e ec2_fleet_rotate_key=yes" in out and "nothing was created or changed" in out, out[-4000:]
    assert ec2.describe_key_pairs(KeyNames=[f"mlpipe-{ENV_C}"])["KeyPairs"] == [key] and aws.tagged(ENV_C) == before
    # a rotation on purpose replaces it (and keeps it C's)
    r = aws.playbook("provision.yml", *given, *mine, "-e", f"ec2_fleet_public_key_file={stray}", "-e", "ec2_fleet_rotate_key=yes")
    ok(r)
    rotated, = ec2.describe_key_pairs(KeyNames=[f"mlpipe-{ENV_C}"])["KeyPairs"]
    assert rotated["KeyFingerprint"] != key["KeyFingerprint"] and changed(r) >= 1
    assert tags(rotated).items() >= {"project": "mlpipe", "env": ENV_C}.items()

    out = " ".join(ok(aws.playbook("teardown.yml", "-e", f"env={ENV_C}", "-e", "confirm=yes", "-e", "delete_bucket=yes")).split())
    assert not any(aws.tagged(ENV_C).values()), aws.tagged(ENV_C)
    # the user's VPC and subnet, and the other env's bucket, are still there, untagged by us
    assert ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"] and tags(ec2.describe_subnets(SubnetIds=[theirs])["Subnets"][0]) == {"Name": "theirs"}
    assert other_bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"] == theirs


def registries(aws, env: str, *extra: str) -> dict:
    """mlpipe_registry as inventory/aws gives it to every host of env and to the controller's localhost
    (debug runs on the controller: nothing connects to the hosts)."""
    r = aws.run("ansible", "-i", "inventory/aws", "load_balancers:model_servers:trainers:localhost", "-e", f"env={env}",
                *extra, "-m", "ansible.builtin.debug", "-a", "var=mlpipe_registry")
    out = ok(r)
    # ansible.cfg's result_format yaml: "HOST | SUCCESS => " then "    mlpipe_registry: s3://.../"
    got = dict(re.findall(r"^(\S+) \| SUCCESS => \s*\n\s+mlpipe_registry: (\S+)$", out, re.M))
    assert got, out
    return got


def test_teardown_removes_only_its_env(aws):
    bucket_b = f"registry-of-{ENV_B}"  # not named <project>-<env>-...: teardown finds it from the instances' tag
    # B on the same default network range as A: the two envs hand out the same private addresses, and
    # inventory/aws names hosts by instance id, so no host of one env takes another's name or variables
    small = ("-e", f"env={ENV_B}", "-e", "ec2_fleet_lb_count=0", "-e", "ec2_fleet_trainers_count=0",
             "-e", f"ec2_fleet_bucket={bucket_b}", "-e", "ec2_fleet_deploy_from_trainers=true")
    ok(aws.playbook("provision.yml", *small, "-e", "ec2_fleet_model_servers_count=2"))
    # deploys from the trainers: their policy (only theirs) also lists instances, for inventory/aws
    iam = aws.client("iam")
    for level in ("read", "write"):
        doc = iam.get_role_policy(RoleName=f"mlpipe-{ENV_B}-registry-{level}", PolicyName=f"registry-{level}")["PolicyDocument"]
        doc = json.loads(doc) if isinstance(doc, str) else doc
        grants = {(a, s["Resource"]) for s in doc["Statement"] for a in s["Action"]}
        assert (("ec2:DescribeInstances", "*") in grants) == (level == "write"), (level, grants)
        assert {a for a, _ in grants} - {"ec2:DescribeInstances"} <= {
            "s3:ListBucket", "s3:GetBucketLocation", "s3:GetObject", "s3:GetObjectVersion", "s3:PutObject",
            "s3:DeleteObject", "s3:AbortMultipartUpload"}, grants
    # B's own bucket name reaches its hosts and the controller through the instances' tag, with no -e;
    # -e mlpipe_registry_bucket still overrides it
    b_hosts = {i["InstanceId"] for i in aws.instances(ENV_B, "model_servers", ["running"])}
    assert registries(aws, ENV_B) == {**{h: f"s3://{bucket_b}/" for h in b_hosts}, "localhost": f"s3://{bucket_b}/"}
    assert set(registries(aws, ENV_B, "-e", "mlpipe_registry_bucket=elsewhere").values()) == {"s3://elsewhere/"}
    # B has no balancer at all (lb count 0): nothing to drain, the shrink says so and terminates
    # (inventory/aws, as a user would run it)
    out = " ".join(ok(aws.playbook("provision.yml", "-i", "inventory/aws", *small, "-e", "ec2_fleet_model_servers_count=1")).split())
    assert "Not draining" in out and f"env {ENV_B} has no balancer (lb count 0)" in out, out[-3000:]
    b_before = aws.tagged(ENV_B)
    assert len(b_before["instances"]) == 1 and len(b_before["buckets"]) == 1 and len(b_before["roles"]) == 2
    assert len(b_before["instance_profiles"]) == 2 and len(b_before["security_groups"]) == 3
    s3 = aws.client("s3")
    bucket_a, = aws.tagged(ENV_A)["buckets"]
    for body in (b"v1", b"v2"):  # versions and a delete marker: all must go
        s3.put_object(Bucket=bucket_a, Key="registry/m/manifest.json", Body=body)
    s3.delete_object(Bucket=bucket_a, Key="registry/m/manifest.json")

    out = " ".join(ok(aws.playbook("teardown.yml", "-e", f"env={ENV_A}", "-e", "confirm=yes")).split())
    assert f"kept the registry bucket(s) {bucket_a}" in out
    account = aws.client("sts").get_caller_identity()["Account"]
    assert f"env {ENV_A} in AWS account {account}" in out and "region us-east-1" in out, out[-3000:]
    left = aws.tagged(ENV_A)
    assert left["buckets"] == [bucket_a] and not any(v for k, v in left.items() if k != "buckets"), left

    out = ok(aws.playbook("teardown.yml", "-e", f"env={ENV_A}", "-e", "confirm=yes", "-e", "delete_bucket=yes"))
    assert not any(aws.tagged(ENV_A).values()), aws.tagged(ENV_A)
    assert bucket_a not in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    assert aws.tagged(ENV_B) == b_before

    # B's bucket has a name of its own: teardown finds it from its instances' mlpipe_bucket tag
    out = " ".join(ok(aws.playbook("teardown.yml", "-e", f"env={ENV_B}", "-e", "confirm=yes", "-e", "delete_bucket=yes")).split())
    assert f"deleted the registry bucket(s) {bucket_b}" in out, out[-3000:]
    assert not any(aws.tagged(ENV_B).values()), aws.tagged(ENV_B)
