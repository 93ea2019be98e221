//! Links the binary's ring set-up through postern's `ring.rs` (see there for why).

fn main() {
    println!("cargo:rustc-link-arg-bins=-Wl,--wrap=io_uring_queue_init_params");
    println!("cargo:rerun-if-changed=build.rs");
}
