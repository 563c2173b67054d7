fn main() {
    println!("{}", hb::EBPF_OBJECT.len());
}
