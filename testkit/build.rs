//! Rebuilds the crate when `sql/` gains a migration: `embed_migrations!`
//! lists the folder at compile time, and cargo would otherwise track only
//! the files it read then.
fn main() {
    println!("cargo:rerun-if-changed=../sql");
}
