//! The worker's policy (terraform's document, the one every other test runs the worker under)
//! allows exactly the AWS actions the code calls: every cloud call of `jobs/src/cloud/` names
//! its action in its error (`classify_aws("ec2:ModifyVolume", ..)`), and those names and the
//! policy's actions are the same set. A call added without its permission, or a permission left
//! behind by a call removed, fails here; what the call needs of resources and conditions is
//! tested by running the workflows under the document.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The actions the worker's code names where it calls AWS.
fn called_actions() -> BTreeSet<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jobs/src");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut actions = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for rest in text.split("classify_aws(").skip(1) {
            let rest = rest.trim_start();
            let Some(quoted) = rest.strip_prefix('"') else {
                continue;
            };
            if let Some((action, _)) = quoted.split_once('"') {
                actions.insert(action.to_string());
            }
        }
    }
    actions
}

/// The actions the policy document allows.
fn allowed_actions() -> BTreeSet<String> {
    let text = std::fs::read_to_string(hive_tests::aws_iam::worker_policy_path()).unwrap();
    // The array placeholders are JSON once filled; any array parses the same here.
    let text = text
        .replace("${image_arns}", "[]")
        .replace("${subnet_arns}", "[]")
        .replace("${security_group_arns}", "[]");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut actions = BTreeSet::new();
    for statement in doc["Statement"].as_array().unwrap() {
        assert_eq!(statement["Effect"], "Allow", "{statement}");
        match &statement["Action"] {
            serde_json::Value::String(a) => {
                actions.insert(a.clone());
            }
            serde_json::Value::Array(list) => {
                actions.extend(list.iter().map(|a| a.as_str().unwrap().to_string()));
            }
            other => panic!("statement without actions: {other}"),
        }
    }
    actions
}

#[test]
fn the_policy_allows_exactly_the_actions_the_worker_calls() {
    let mut called = called_actions();
    assert!(called.len() > 15, "the calls were not found: {called:?}");
    // A launch passes the instance profile's role: IAM checks iam:PassRole, not a call of ours.
    called.insert("iam:PassRole".into());
    let allowed = allowed_actions();
    let missing: Vec<_> = called.difference(&allowed).collect();
    let unused: Vec<_> = allowed.difference(&called).collect();
    assert!(
        missing.is_empty() && unused.is_empty(),
        "called but not allowed: {missing:?}; allowed but never called: {unused:?}"
    );
    assert!(allowed.iter().all(|a| !a.contains('*')), "{allowed:?}");
}
