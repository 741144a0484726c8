fn main() {
    println!("{}", lb_user::programs::LB_OBJECT.len());
}
