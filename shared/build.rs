//! `sqlx::migrate!` embeds `migrations/` at compile time; without this, adding a migration
//! file does not rebuild the binaries that apply them (what `sqlx migrate build-script` writes).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
