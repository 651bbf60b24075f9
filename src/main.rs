fn main() {
    std::process::exit(groupflow::cli::main());
}
