//! Renders the node user-data for a few sample nodes into a folder (used by CI's checks).

use hive_jobs::user_data::{render, UserDataParams};

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: render-user-data <folder>");
        std::process::exit(2);
    };
    let samples = [
        (
            "eu-west-1",
            Some("https://downloads.example.com/edge-node_1.4.2_arm64.deb"),
        ),
        ("us-east-2", None),
    ];
    for (i, (region, package)) in samples.into_iter().enumerate() {
        let node_id = uuid::Uuid::new_v4();
        let secret_id = hive_jobs::model::secret_name(node_id);
        let hostname = format!("{node_id}.nodes.example.com");
        let rendered = match render(&UserDataParams {
            node_id,
            region,
            secret_id: &secret_id,
            hostname: &hostname,
            edge_service_port: 8080,
            edge_package_url: package,
        }) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("render-user-data: {e}");
                std::process::exit(1);
            }
        };
        let path = format!("{dir}/node-{i}.yaml");
        if let Err(e) = std::fs::write(&path, rendered) {
            eprintln!("render-user-data: writing {path}: {e}");
            std::process::exit(1);
        }
    }
}
