//! What the customer's app is told of a failure: a stable code and a plain message with a
//! reference, never a provider's text (ARNs, our account id, subnet and group ids, encoded
//! authorization messages). The operator's `hivectl node` and the logs keep the whole cause.

/// A failure as the app sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicError {
    /// Stable, for the app to branch on (`launch_refused`, `dns_refused`...).
    pub code: &'static str,
    /// Plain words, and the reference the operator finds the cause by.
    pub message: String,
}

/// What the app is told of `raw` (a step's error as the worker recorded it, `op: message`),
/// with `reference` for the operator.
pub fn public_error(raw: &str, reference: &str) -> PublicError {
    let op = raw.split(": ").next().unwrap_or_default();
    let (service, action) = op.split_once(':').unwrap_or((op, ""));
    let (code, what) = match (service, action) {
        ("ec2", "RunInstances") => ("launch_refused", "the cloud refused to launch the node"),
        ("ec2", "DescribeImages") => ("image_unavailable", "the node's image is not available"),
        ("ec2", _) => (
            "instance_refused",
            "the cloud refused a change to the node's instance",
        ),
        ("secretsmanager", _) => (
            "secret_refused",
            "the cloud refused to keep the node's secret",
        ),
        ("route53", _) => ("dns_refused", "the DNS provider refused the node's record"),
        ("rate budget", _) => ("busy", "the cloud is busy"),
        (s, _) if s.starts_with("cloudflare") => (
            "tunnel_refused",
            "Cloudflare refused the node's tunnel or record",
        ),
        _ => ("step_failed", "a step of the node failed"),
    };
    let message = if raw.ends_with("(transient)") {
        format!("{what} for now; retrying (reference {reference})")
    } else {
        format!("{what} (reference {reference})")
    };
    PublicError { code, message }
}

/// `text` with the providers' identifiers the app must not see replaced by what they are:
/// ARNs, twelve-digit account ids, subnet, security group, VPC and image ids; an encoded
/// authorization message is cut off.
pub fn scrub(text: &str) -> String {
    let text = match text.find("Encoded authorization failure message") {
        Some(at) => text[..at].trim_end(),
        None => text,
    };
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let core = word.trim_matches(|c: char| "()[],;'\"".contains(c));
        let core = core.trim_end_matches(['.', ':']);
        let kind = if core.starts_with("arn:") {
            Some("[arn]")
        } else if core.len() == 12 && core.bytes().all(|b| b.is_ascii_digit()) {
            Some("[account]")
        } else {
            [
                ("subnet-", "[subnet]"),
                ("sg-", "[security group]"),
                ("vpc-", "[vpc]"),
                ("ami-", "[image]"),
            ]
            .into_iter()
            .find(|(prefix, _)| core.starts_with(prefix) && core.len() > prefix.len())
            .map(|(_, kind)| kind)
        };
        match kind {
            Some(kind) if !core.is_empty() => out.push_str(&word.replacen(core, kind, 1)),
            _ => out.push_str(word),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_app_is_told_what_failed_never_the_providers_text() {
        let raw = "ec2:RunInstances: UnauthorizedOperation: You are not authorized to perform \
                   this operation. User: arn:aws:sts::123456789012:assumed-role/hive-worker/x is \
                   not authorized to perform: ec2:RunInstances on resource: \
                   arn:aws:ec2:eu-west-1:123456789012:subnet/subnet-0abc. Encoded authorization \
                   failure message: AbC123";
        let told = public_error(raw, "3f2a9c1e/launching_instance");
        assert_eq!(told.code, "launch_refused");
        assert_eq!(
            told.message,
            "the cloud refused to launch the node (reference 3f2a9c1e/launching_instance)"
        );
        for secret in ["arn:", "123456789012", "subnet-", "AbC123", "Unauthorized"] {
            assert!(!told.message.contains(secret), "{secret}");
        }
        let retrying = public_error(
            "route53:GetChange: Throttling: Rate exceeded (transient)",
            "r",
        );
        assert_eq!(retrying.code, "dns_refused");
        assert!(
            retrying.message.contains("retrying"),
            "{}",
            retrying.message
        );
        assert_eq!(
            public_error("cloudflare: 1022 busy", "r").code,
            "tunnel_refused"
        );
        assert_eq!(
            public_error("state machine: no tunnel", "r").code,
            "step_failed"
        );
    }

    #[test]
    fn scrubbing_leaves_our_words_and_hides_theirs() {
        assert_eq!(
            scrub(
                "launched as t4g.medium in subnet-0abc123 (eu-west-1a): no capacity for t4g.small"
            ),
            "launched as t4g.medium in [subnet] (eu-west-1a): no capacity for t4g.small"
        );
        assert_eq!(
            scrub("denied for arn:aws:iam::123456789012:role/x, account 123456789012."),
            "denied for [arn], account [account]."
        );
        assert_eq!(scrub("instance is pending"), "instance is pending");
        assert_eq!(
            scrub("no. Encoded authorization failure message: xyz"),
            "no."
        );
        assert_eq!(
            scrub("in sg-0123 of vpc-9 from ami-42"),
            "in [security group] of [vpc] from [image]"
        );
    }
}
