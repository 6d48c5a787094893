"""`ray up`'s AWS bootstrap (Ray's own `bootstrap_aws`) on ray_cluster.yaml as render_cluster_config.py
fills it in, against the one-time resources of infra/aws/spot-cluster.cfn.yaml made in moto.

The network resources (VPC, subnets with their zones and public-IP mapping, security groups with their
rules) are read from the template itself, so a change there changes what the launcher meets here. The
stack's outputs are those of a moto CloudFormation stack, read by the render script's real code.
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws
from ray.autoscaler._private.aws.config import bootstrap_aws
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.cfn import CfnLoader
from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[1]
RENDER = "infra/aws/render_cluster_config.py"
TEMPLATE = yaml.load((REPO / "infra/aws/spot-cluster.cfn.yaml").read_text(), Loader=CfnLoader)
REGION = "us-east-1"
ZONES = ["us-east-1a", "us-east-1b", "us-east-1c"]
ADMIN_CIDR = "203.0.113.7/32"
STACK = "spot-ray"
ACCOUNT = "123456789012"  # moto's account


def _of_type(kind: str) -> dict[str, dict]:
    return {name: res["Properties"] for name, res in TEMPLATE["Resources"].items() if res["Type"] == kind}


def _zone(select) -> str:
    """A subnet's AvailabilityZone in the template: !Select [i, !Ref AvailabilityZones]."""
    index, source = select["Fn::Select"]
    assert source == {"Ref": "AvailabilityZones"}
    return ZONES[int(index)]


def _create_network(ec2) -> dict[str, str]:
    """VPC, subnets and security groups (with their rules) as the template declares them; logical name ->
    physical id."""
    ids: dict[str, str] = {}
    (vpc_name, vpc) = next(iter(_of_type("AWS::EC2::VPC").items()))
    ids[vpc_name] = ec2.create_vpc(CidrBlock=TEMPLATE["Parameters"]["VpcCidr"]["Default"])["Vpc"]["VpcId"]
    for n, (name, props) in enumerate(_of_type("AWS::EC2::Subnet").items()):
        subnet = ec2.create_subnet(VpcId=ids[vpc_name], CidrBlock=f"10.42.{n * 16}.0/20",
                                   AvailabilityZone=_zone(props["AvailabilityZone"]))["Subnet"]["SubnetId"]
        public_ips = {"Value": props["MapPublicIpOnLaunch"]}
        ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch=public_ips)
        ids[name] = subnet
    groups = _of_type("AWS::EC2::SecurityGroup")
    for name, props in groups.items():
        ids[name] = ec2.create_security_group(GroupName=name, Description=props["GroupDescription"],
                                              VpcId=ids[vpc_name])["GroupId"]

    def permission(rule: dict) -> dict:
        perm = {"IpProtocol": str(rule["IpProtocol"])}
        if "FromPort" in rule:
            perm |= {"FromPort": rule["FromPort"], "ToPort": rule["ToPort"]}
        if "CidrIp" in rule:
            cidr = ADMIN_CIDR if rule["CidrIp"] == {"Ref": "AdminCidr"} else rule["CidrIp"]
            perm["IpRanges"] = [{"CidrIp": cidr}]
        if "SourceSecurityGroupId" in rule:
            perm["UserIdGroupPairs"] = [{"GroupId": ids[rule["SourceSecurityGroupId"]["Ref"]]}]
        return perm

    for name, props in groups.items():
        for rule in props.get("SecurityGroupIngress", []):
            ec2.authorize_security_group_ingress(GroupId=ids[name], IpPermissions=[permission(rule)])
    for props in _of_type("AWS::EC2::SecurityGroupIngress").values():
        group = ids[props["GroupId"]["Ref"]]
        ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[permission(props)])
    return ids


def _create_the_rest(ids: dict[str, str]) -> dict[tuple[str, str], str]:
    """Instance profiles, placement group, bucket, file system, secrets, image repository, database;
    fills ids and returns the attributes (!GetAtt) the outputs use."""
    attrs: dict[tuple[str, str], str] = {}
    iam = boto3.client("iam")
    trust = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]})
    for role in _of_type("AWS::IAM::Role"):
        ids[role] = iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)["Role"]["RoleName"]
    for name, props in _of_type("AWS::IAM::InstanceProfile").items():
        profile = iam.create_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        (role,) = props["Roles"]
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=ids[role["Ref"]])
        ids[name], attrs[(name, "Arn")] = name, profile["Arn"]
    for name in _of_type("AWS::EC2::PlacementGroup"):
        ids[name] = f"{STACK}-{name}"  # moto has no placement groups; the bootstrap does not look them up
    ids["FileSystem"] = boto3.client("efs").create_file_system(CreationToken="spot")["FileSystemId"]
    sm = boto3.client("secretsmanager")
    for name in _of_type("AWS::SecretsManager::Secret"):
        ids[name] = sm.create_secret(Name=name, SecretString="{}")["ARN"]
    repo = boto3.client("ecr").create_repository(repositoryName="spot-vit")["repository"]
    attrs[("ImageRepository", "RepositoryUri")] = repo["repositoryUri"]
    db = boto3.client("rds").create_db_instance(
        DBInstanceIdentifier="spot-mlflow", DBInstanceClass="db.t4g.small", Engine="postgres",
        MasterUsername="mlflow", MasterUserPassword="password123", AllocatedStorage=20)["DBInstance"]
    attrs[("Database", "Endpoint.Address")] = db["Endpoint"]["Address"]
    return attrs


def _output_value(value, ids: dict, attrs: dict) -> str:
    """An Outputs value of the template, resolved against the resources made in moto."""
    if "Ref" in value:
        if value["Ref"] == "AWS::Region":
            return REGION
        if value["Ref"] == "AvailabilityZones":
            return ZONES
        return ids[value["Ref"]]
    if "Fn::Join" in value:
        sep, items = value["Fn::Join"]
        return sep.join(_output_value(items, ids, attrs))
    if "Fn::GetAtt" in value:
        name, attr = value["Fn::GetAtt"]
        return attrs[(name, attr)]
    if "Fn::Sub" in value:
        return value["Fn::Sub"].replace("${AWS::AccountId}", ACCOUNT).replace("${AWS::Region}", REGION)
    raise AssertionError(f"an output form this test does not resolve: {value}")


def _create_stack(ids: dict, attrs: dict) -> None:
    """A stack named STACK whose outputs are the template's, resolved to the moto resources (its one
    resource is the bucket, so BucketName is the stack's own)."""
    outputs = {}
    for key, out in TEMPLATE["Outputs"].items():
        if out["Value"] == {"Ref": "Bucket"}:
            outputs[key] = {"Value": {"Ref": "Bucket"}}
        else:
            outputs[key] = {"Value": _output_value(out["Value"], ids, attrs)}
    body = {"Resources": {"Bucket": {"Type": "AWS::S3::Bucket"}}, "Outputs": outputs}
    boto3.client("cloudformation").create_stack(StackName=STACK, TemplateBody=json.dumps(body))


@pytest.fixture
def aws(tmp_path, monkeypatch):
    """moto in-process, credentials and HOME of this test only (bootstrap writes ~/.ssh/<key>.pem)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    with mock_aws():
        yield tmp_path


def _group_rules(ec2, vpc_id: str) -> dict[str, list]:
    groups = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    return {g["GroupId"]: g["IpPermissions"] for g in groups}


def _stack_and_render(tmp_path: Path) -> tuple[dict, dict, str, Path]:
    ec2 = boto3.client("ec2")
    ids = _create_network(ec2)
    attrs = _create_the_rest(ids)
    _create_stack(ids, attrs)
    ami = ec2.register_image(Name="dlami-base-oss-nvidia", RootDeviceName="/dev/sda1")["ImageId"]
    out = tmp_path / "spot" / "ray_cluster.yaml"
    code = load_script(RENDER).main(["--stack", STACK, "--region", REGION, "--ami", ami, "--out", str(out)])
    assert code == 0
    return ids, attrs, ami, out


def test_ray_bootstrap_accepts_the_rendered_config(aws):
    """What `ray up` does before launching the head: Ray's prepare_config, validate_config, bootstrap_aws."""
    ids, _, ami, out = _stack_and_render(aws)
    ec2 = boto3.client("ec2")
    before = _group_rules(ec2, ids["Vpc"])

    config = prepare_config(yaml.safe_load(out.read_text()))
    validate_config(config)
    booted = bootstrap_aws(config)

    after = _group_rules(ec2, ids["Vpc"])
    assert after == before, "the launcher created or changed security groups"
    open_to_world = [g for g, rules in after.items() for r in rules
                     if any(ip["CidrIp"] == "0.0.0.0/0" for ip in r.get("IpRanges", []))]
    assert not open_to_world
    public = {n for n, p in _of_type("AWS::EC2::Subnet").items() if p["MapPublicIpOnLaunch"]}
    private = set(_of_type("AWS::EC2::Subnet")) - public
    expected_subnets = {
        booted["head_node_type"]: {ids[n] for n in public},
        "gpu_8x_a100": {ids[n] for n in private},
        "gpu_8x_h100": {ids[n] for n in private},
        "gpu_8x_a100_efa": {ids["PrivateSubnet1"]},  # one placement group, one zone
    }
    assert set(booted["available_node_types"]) == set(expected_subnets)
    for name, node_type in booted["available_node_types"].items():
        node = node_type["node_config"]
        assert set(node["SubnetIds"]) == expected_subnets[name], name
        assert ids["NodesSecurityGroup"] in node["SecurityGroupIds"], name
        assert set(node["SecurityGroupIds"]) <= set(before), name
        assert node["ImageId"] == ami and node["KeyName"].startswith("ray-autoscaler"), name
    head = booted["available_node_types"][booted["head_node_type"]]["node_config"]
    assert ids["HeadSecurityGroup"] in head["SecurityGroupIds"]
    # the launcher reaches the head (public subnet) on its public IP, the workers on private ones
    provider = booted["provider"]
    assert provider["use_internal_ips"] is True and provider["use_external_head_ip"] is True
    assert Path(booted["auth"]["ssh_private_key"]).is_file()


def test_ray_bootstrap_refuses_private_worker_subnets_without_internal_ips(aws):
    """The check above is live: without use_internal_ips Ray's bootstrap stops at the worker subnets (the
    error of issue 23)."""
    _, _, _, out = _stack_and_render(aws)
    config = yaml.safe_load(out.read_text())
    del config["provider"]["use_internal_ips"]
    with pytest.raises(Exception, match="No usable subnets found for node type gpu_8x"):
        bootstrap_aws(prepare_config(config))


def test_render_refuses_a_stack_without_an_output(aws, capsys):
    """A stack that lacks an output the config names: exit 2, the placeholder named, nothing written."""
    boto3.client("cloudformation").create_stack(StackName=STACK, TemplateBody=json.dumps(
        {"Resources": {"Bucket": {"Type": "AWS::S3::Bucket"}}, "Outputs": {"Region": {"Value": REGION}}}))
    out = aws / "spot" / "ray_cluster.yaml"
    argv = ["--stack", STACK, "--region", REGION, "--ami", "ami-12345678", "--out", str(out)]
    code = load_script(RENDER).main(argv)
    assert code == 2 and "REPLACE-HeadSubnetId" in capsys.readouterr().err
    assert not out.exists()


def test_a_multi_node_config_launches_one_type_in_one_zone(aws):
    """Issue 23 item 8: --multi-node N leaves the placement-group type (one subnet, one zone, one
    instance type) as the only GPU workers, and Ray's bootstrap accepts it."""
    ids, _, _, out = _stack_and_render(aws)
    ami = yaml.safe_load(out.read_text())["available_node_types"]["gpu_8x_a100"]["node_config"]["ImageId"]
    multi = aws / "spot" / "ray_cluster_multinode.yaml"
    argv = ["--stack", STACK, "--region", REGION, "--ami", ami, "--out", str(multi), "--multi-node", "2"]
    assert load_script(RENDER).main(argv) == 0
    config = prepare_config(yaml.safe_load(multi.read_text()))
    validate_config(config)
    booted = bootstrap_aws(config)
    launching = {name: t for name, t in booted["available_node_types"].items() if t["max_workers"] > 0}
    assert list(launching) == ["gpu_8x_a100_efa"] and launching["gpu_8x_a100_efa"]["max_workers"] == 2
    assert booted["max_workers"] >= 2
    node = launching["gpu_8x_a100_efa"]["node_config"]
    assert set(node["SubnetIds"]) == {ids["PrivateSubnet1"]}
    assert node["Placement"]["GroupName"] == ids["PlacementGroup"]
    # everything else is as in the single-node file
    single = yaml.safe_load(out.read_text())
    for key in ("setup_commands", "worker_setup_commands", "docker", "provider", "file_mounts"):
        assert yaml.safe_load(multi.read_text())[key] == single[key], key


def test_multi_node_refuses_a_single_node(aws, capsys):
    with pytest.raises(SystemExit) as exited:
        load_script(RENDER).main(["--region", REGION, "--out", str(aws / "x.yaml"), "--multi-node", "1"])
    assert exited.value.code == 2 and "--multi-node 1" in capsys.readouterr().err


def test_render_refuses_a_missing_stack(aws, capsys):
    """A wrong --stack: one line naming the stack, exit 2, nothing written."""
    out = aws / "spot" / "ray_cluster.yaml"
    code = load_script(RENDER).main(["--stack", "no-such-stack", "--region", REGION, "--out", str(out)])
    assert code == 2 and "stack no-such-stack in us-east-1" in capsys.readouterr().err
    assert not out.exists()
