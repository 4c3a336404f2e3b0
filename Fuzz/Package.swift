// swift-tools-version:6.1
import PackageDescription

// libFuzzer targets for Braid. Kept out of the main package because they are built with
// `-sanitize=fuzzer,address`, which must not leak into normal builds. See README.md here.
let package = Package(
    name: "BraidFuzz",
    dependencies: [
        .package(name: "Braid", path: ".."),
    ],
    targets: [
        .executableTarget(
            name: "FuzzStreamParser",
            dependencies: [
                .product(name: "XMPPStream", package: "Braid"),
                .product(name: "XMPPCore", package: "Braid"),
            ]
        ),
        .executableTarget(
            name: "FuzzJID",
            dependencies: [
                .product(name: "XMPPCore", package: "Braid"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
