//! The settings' parsing, each malformed value refused with its name.

use super::*;
use std::collections::HashMap;

fn env(pairs: &[(&str, &str)]) -> Env<impl Fn(&str) -> Option<String>> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Env(move |k: &str| map.get(k).cloned())
}

#[test]
fn plans_parse_and_reject_nonsense() {
    let plans: Plans = DEFAULT_PLANS.parse().unwrap();
    assert_eq!(plans, default_plans());
    assert_eq!(plans.0["team"].nodes, 5);
    assert_eq!(plans.0["pro"].instance_type, "t4g.small");
    assert_eq!(plans.0["pro"].volume_gb, 10);
    assert_eq!(
        "pro=t4g.small:1".parse::<Plans>().unwrap().0["pro"].volume_gb,
        10
    );
    assert!("team=m5.large:5".parse::<Plans>().is_err());
    assert!("team=t4g.small:zero".parse::<Plans>().is_err());
    assert!("".parse::<Plans>().is_err());
}

fn file_env(
    text: &str,
) -> (
    tempfile_path::TempPath,
    Env<impl Fn(&str) -> Option<String>>,
) {
    let path = tempfile_path::TempPath::write(text);
    let shown = path.0.display().to_string();
    (
        path,
        Env(move |k: &str| (k == "HIVE_CONFIG_FILE").then(|| shown.clone())),
    )
}

/// A file removed when dropped (std only).
mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn write(text: &str) -> Self {
            let path = std::env::temp_dir().join(format!(
                "hive-config-{}.toml",
                uuid::Uuid::new_v4().simple()
            ));
            std::fs::write(&path, text).expect("writing a temp file");
            TempPath(path)
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn plans_come_from_the_config_file_with_their_prices() {
    let (_file, env) = file_env(
        "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nvolume_gb = 10\nprices = [\"price_1Pro\"]\n\n[plans.big]\ninstance_type = \"t4g.large\"\nnodes = 3\n",
    );
    let plans = ConfigFile::from_env(&env).unwrap().plans(&env).unwrap();
    assert_eq!(plans.0.len(), 2);
    assert_eq!(plans.0["big"].volume_gb, 10);
    assert_eq!(
        plans.for_price("price_1Pro", None, None).map(|p| p.0),
        Some("pro")
    );
    assert_eq!(
        plans.for_price("price_x", Some("big"), None).map(|p| p.0),
        Some("big")
    );
    assert_eq!(
        plans.for_price("price_x", None, Some("pro")).map(|p| p.0),
        Some("pro")
    );
    assert_eq!(plans.for_price("price_x", Some("nope"), None), None);
}

#[test]
fn a_malformed_config_file_is_one_line_naming_the_file_and_key() {
    for (text, expected) in [
        (
            "[plans.pro]\ninstance_type = \"m5.large\"\nnodes = 1\n",
            "plans.pro.instance_type: `m5.large` is not a t4g",
        ),
        (
            "[plans.pro]\ninstance_type = \"t4g.small\"\n",
            "plans.pro.nodes: missing",
        ),
        (
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = \"one\"\n",
            "plans.pro.nodes: must be an integer",
        ),
        (
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\ncolour = 2\n",
            "plans.pro.colour: unknown key",
        ),
        ("[plans.pro\nnodes = 1\n", "line 1"),
    ] {
        let (file, env) = file_env(text);
        let e = ConfigFile::from_env(&env).unwrap_err().to_string();
        assert!(
            e.starts_with("configuration: HIVE_CONFIG_FILE is malformed: "),
            "{e}"
        );
        assert!(e.contains(&file.0.display().to_string()), "{e}");
        assert!(e.contains(expected), "{text}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

const TWO_REGIONS: &str = "[regions.eu-west-1]\nami = \"ami-0abc\"\nsubnets = [\"subnet-a\", \"subnet-b\"]\nsecurity_group = \"sg-0abc\"\ninstance_profile = \"hive-node\"\n\n[regions.us-east-1]\nami_parameter = \"/aws/service/debian/release/12/latest/arm64\"\nsubnets = [\"subnet-c\"]\nsecurity_group = \"sg-0def\"\ninstance_profile = \"hive-node\"\n\n[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nfallback_types = [\"t4g.medium\"]\n";

#[test]
fn regions_come_from_the_config_file_else_the_shorthand() {
    let (_file, from_file) = file_env(TWO_REGIONS);
    let file = ConfigFile::from_env(&from_file).unwrap();
    let regions = file.region_settings(&from_file).unwrap();
    assert_eq!(regions.len(), 2);
    assert_eq!(regions[0].name, "eu-west-1");
    assert_eq!(regions[0].subnets, vec!["subnet-a", "subnet-b"]);
    assert_eq!(regions[0].image.launch_image_id(), "ami-0abc");
    assert_eq!(
        regions[1].image.launch_image_id(),
        "resolve:ssm:/aws/service/debian/release/12/latest/arm64"
    );
    assert_eq!(
        file.plans(&from_file).unwrap().0["pro"].fallback_types,
        vec!["t4g.medium"]
    );

    let shorthand = env(&[
        ("AWS_REGION", "eu-west-1"),
        ("HIVE_AMI_ID", "ami-1"),
        ("HIVE_SUBNET_ID", "subnet-1, subnet-2"),
        ("HIVE_SECURITY_GROUP_ID", "sg-1"),
        ("HIVE_INSTANCE_PROFILE", "p"),
    ]);
    let regions = ConfigFile::default().region_settings(&shorthand).unwrap();
    assert_eq!(regions.len(), 1);
    assert_eq!(regions[0].name, "eu-west-1");
    assert_eq!(regions[0].subnets, vec!["subnet-1", "subnet-2"]);
}

#[test]
fn malformed_regions_are_named() {
    for (text, expected) in [
        (
            "[regions.eu-west-1]\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
            "regions.eu-west-1: set exactly one of ami, ami_parameter",
        ),
        (
            "[regions.eu-west-1]\nami = \"ami-1\"\nsubnets = []\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
            "regions.eu-west-1.subnets: name at least one subnet",
        ),
        (
            "[regions.eu-west-1]\nami = \"ami-1\"\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\nzone = 1\n",
            "unknown field `zone`",
        ),
        (
            "[regions.Mars]\nami = \"ami-1\"\nsubnets = [\"subnet-a\"]\nsecurity_group = \"sg-1\"\ninstance_profile = \"p\"\n",
            "`Mars` is not a region name",
        ),
        (
            "[plans.pro]\ninstance_type = \"t4g.small\"\nnodes = 1\nfallback_types = [\"m5.large\"]\n",
            "plans.pro.fallback_types: `m5.large` is not a t4g",
        ),
    ] {
        let (_file, env) = file_env(text);
        let e = ConfigFile::from_env(&env).unwrap_err().to_string();
        assert!(e.contains(expected), "{text}: {e}");
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}

#[test]
fn the_api_accepts_exactly_the_configured_regions() {
    let (file, _) = file_env(TWO_REGIONS);
    let path = file.0.display().to_string();
    let base = [
        ("STRIPE_WEBHOOK_SECRET", "whsec_a"),
        ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
        ("DATABASE_URL", "postgres://x"),
        ("HIVE_NODE_DOMAIN", "nodes.example.com"),
        ("HIVE_CONFIG_FILE", path.as_str()),
    ];
    let api = ApiConfig::from_env(&env(&base)).unwrap();
    assert_eq!(api.regions, vec!["eu-west-1", "us-east-1"]);
    assert_eq!(api.default_region, "eu-west-1");
    let mut with_default = base.to_vec();
    with_default.push(("HIVE_DEFAULT_REGION", "us-east-1"));
    assert_eq!(
        ApiConfig::from_env(&env(&with_default))
            .unwrap()
            .default_region,
        "us-east-1"
    );
    let mut unknown = base.to_vec();
    unknown.push(("HIVE_DEFAULT_REGION", "ap-south-1"));
    let e = ApiConfig::from_env(&env(&unknown)).unwrap_err();
    assert!(e.to_string().contains("HIVE_DEFAULT_REGION"), "{e}");
    let mut legacy = base.to_vec();
    legacy.push(("HIVE_REGIONS", "eu-west-1,ap-south-1"));
    let e = ApiConfig::from_env(&env(&legacy)).unwrap_err();
    assert!(e.to_string().contains("[regions.<name>]"), "{e}");
}

#[test]
fn missing_and_malformed_settings_are_named() {
    let e = ApiConfig::from_env(&env(&[])).unwrap_err();
    assert_eq!(
        e.to_string(),
        "configuration: STRIPE_WEBHOOK_SECRET is not set"
    );
    let e = ApiConfig::from_env(&env(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_a,whsec_b"),
        ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
        ("DATABASE_URL", "postgres://x"),
        ("HIVE_API_ADDR", "not-an-addr"),
        ("AWS_REGION", "eu-west-1"),
        ("HIVE_NODE_DOMAIN", "nodes.example.com"),
    ]))
    .unwrap_err();
    assert!(e
        .to_string()
        .starts_with("configuration: HIVE_API_ADDR is malformed"));
    let ok = ApiConfig::from_env(&env(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_a, whsec_b"),
        ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
        ("DATABASE_URL", "postgres://x"),
        ("AWS_REGION", "eu-west-1"),
        ("HIVE_NODE_DOMAIN", "Nodes.Example.com."),
    ]))
    .unwrap();
    assert_eq!(ok.stripe_webhook_secrets, vec!["whsec_a", "whsec_b"]);
    assert_eq!(ok.node_domain, "nodes.example.com");
    assert_eq!(ok.db_connections, 4);
    assert!(!format!("{ok:?}").contains("whsec_a"));
    let e = ApiConfig::from_env(&env(&[
        ("STRIPE_WEBHOOK_SECRET", "whsec_a"),
        ("HIVE_JWT_SECRET", "0123456789abcdef0123"),
        ("DATABASE_URL", "postgres://x"),
        ("AWS_REGION", "eu-west-1"),
        ("HIVE_NODE_DOMAIN", "nodes.example.com"),
        ("HIVE_API_DB_CONNECTIONS", "0"),
    ]))
    .unwrap_err();
    assert!(e.to_string().contains("HIVE_API_DB_CONNECTIONS"), "{e}");
}
#[test]
fn rates_parse_and_nonsense_is_refused() {
    let r: Rate = "1200/300s".parse().unwrap();
    assert_eq!(r.calls, 1200);
    assert_eq!(r.per, Duration::from_secs(300));
    assert!((r.per_sec() - 4.0).abs() < 1e-9);
    assert!((r.burst() - 120.0).abs() < 1e-9);
    let r: Rate = "5/1s".parse().unwrap();
    assert!((r.burst() - 1.0).abs() < 1e-9);
    assert_eq!(
        "100/2m".parse::<Rate>().unwrap().per,
        Duration::from_secs(120)
    );
    assert_eq!(parse_budget("off"), Ok(None));
    for bad in [
        "", "90", "90/", "0/10s", "90/0s", "90/10h", "x/10s", "90/10",
    ] {
        assert!(bad.parse::<Rate>().is_err(), "{bad}");
    }
}

#[test]
fn a_key_set_needs_https_an_issuer_and_an_audience() {
    let base = [("HIVE_JWT_SECRET", "0123456789abcdef0123")];
    let tokens = |extra: &[(&str, &str)]| {
        let pairs: Vec<(&str, &str)> = base.iter().chain(extra).copied().collect();
        TokenConfig::from_env(&env(&pairs))
    };
    let named = |r: Result<TokenConfig, ConfigError>, name: &str| match r {
        Err(e) => assert!(e.to_string().contains(name), "{e} should name {name}"),
        Ok(_) => panic!("{name} should be refused"),
    };
    let url = (
        "HIVE_JWKS_URL",
        "https://idp.example.com/.well-known/jwks.json",
    );
    let iss = ("HIVE_JWT_ISSUER", "https://idp.example.com/");
    let aud = ("HIVE_JWT_AUDIENCE", "hive");
    named(tokens(&[url]), "HIVE_JWT_ISSUER");
    named(tokens(&[url, iss]), "HIVE_JWT_AUDIENCE");
    named(tokens(&[url, aud]), "HIVE_JWT_ISSUER");
    assert!(tokens(&[url, iss, aud]).is_ok());
    // Plain http only to this machine.
    for bad in [
        "http://idp.example.com/jwks.json",
        "http://127.0.0.1.example.com/jwks.json",
        "ftp://127.0.0.1/jwks.json",
    ] {
        named(tokens(&[("HIVE_JWKS_URL", bad), iss, aud]), "HIVE_JWKS_URL");
    }
    for good in [
        "http://127.0.0.1:4000/jwks.json",
        "http://[::1]:4000/jwks.json",
        "http://localhost/jwks.json",
    ] {
        assert!(
            tokens(&[("HIVE_JWKS_URL", good), iss, aud]).is_ok(),
            "{good}"
        );
    }
    // Issuer and audience stay optional for the shared secret alone.
    assert!(tokens(&[]).is_ok());
    named(
        tokens(&[url, iss, aud, ("HIVE_JWKS_REFRESH_SECS", "7200")]),
        "HIVE_JWKS_REFRESH_SECS",
    );
}

#[test]
fn chaos_is_refused_unless_built_for_the_tests() {
    let set = env(&[("HIVE_CHAOS", "crash_after:launching_instance")]);
    match super::worker::chaos_setting(&set, false) {
        Err(e) => assert!(e.to_string().contains("HIVE_CHAOS"), "{e}"),
        Ok(chaos) => panic!("a production build took HIVE_CHAOS: {chaos:?}"),
    }
    assert_eq!(
        super::worker::chaos_setting(&set, true).unwrap(),
        Some(Chaos::CrashAfter("launching_instance".into()))
    );
    assert_eq!(
        super::worker::chaos_setting(&env(&[]), false).unwrap(),
        None
    );
}

#[test]
fn the_stripe_mode_is_set_or_read_off_the_key_and_both_must_agree() {
    let mode = |pairs: &[(&str, &str)]| {
        let key = pairs
            .iter()
            .find(|(k, _)| *k == "STRIPE_SECRET_KEY")
            .map(|(_, v)| *v);
        super::api::stripe_mode(&env(pairs), key)
    };
    assert_eq!(mode(&[]).unwrap(), None);
    assert_eq!(
        mode(&[("STRIPE_SECRET_KEY", "sk_live_x")]).unwrap(),
        Some(true)
    );
    assert_eq!(
        mode(&[("STRIPE_SECRET_KEY", "rk_test_x")]).unwrap(),
        Some(false)
    );
    assert_eq!(mode(&[("HIVE_STRIPE_MODE", "live")]).unwrap(), Some(true));
    assert!(mode(&[
        ("HIVE_STRIPE_MODE", "live"),
        ("STRIPE_SECRET_KEY", "sk_test_x")
    ])
    .is_err());
    assert!(mode(&[("HIVE_STRIPE_MODE", "prod")]).is_err());
}
