//! Empty library target: lets the dataplane build-depend on this crate so cargo
//! rebuilds the kernel object when these sources change.
#![no_std]
