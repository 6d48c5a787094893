#!/usr/bin/env bash
# Create (or update) the one-time AWS resources of ray_cluster.yaml: infra/aws/spot-cluster.cfn.yaml.
#
#   bash infra/aws/deploy.sh STACK REGION ADMIN_CIDR AZ1,AZ2,AZ3
#   e.g. bash infra/aws/deploy.sh spot-ray us-east-1 203.0.113.7/32 us-east-1a,us-east-1b,us-east-1c
#
# ADMIN_CIDR: where you SSH from (the only source the head admits); the zones: three where you have
# P-instance quota. Takes ~15 minutes (the NAT gateway and the database). Needs the AWS CLI v2 and
# credentials that may create VPC, EC2, IAM, S3, EFS, RDS, Secrets Manager and ECR resources.
set -euo pipefail
[[ $# -eq 4 ]] || { sed -n '2,10p' "$0" >&2; exit 2; }
stack="$1" region="$2" admin_cidr="$3" zones="$4"
[[ "$admin_cidr" != "0.0.0.0/0" ]] || { echo "deploy.sh: ADMIN_CIDR must not be 0.0.0.0/0" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

aws cloudformation deploy --region "$region" --stack-name "$stack" \
  --template-file "$here/spot-cluster.cfn.yaml" --capabilities CAPABILITY_IAM \
  --parameter-overrides "AdminCidr=$admin_cidr" "AvailabilityZones=$zones"
aws cloudformation describe-stacks --region "$region" --stack-name "$stack" \
  --query 'Stacks[0].Outputs[].[OutputKey,OutputValue]' --output table
