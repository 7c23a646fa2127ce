// `sqlx::migrate!` embeds the migrations at compile time; without this, adding a migration
// to an already built tree would not rebuild the crate, and the binaries would miss it.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
