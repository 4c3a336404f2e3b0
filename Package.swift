// swift-tools-version:6.1
import PackageDescription

// Braid: an XMPP server for hosting providers. The module map is described in
// docs/architecture.md; keep this file in step with it.

let strictSettings: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Braid",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "braid", targets: ["braid"]),
        .executable(name: "braid-bench", targets: ["BraidBench"]),
        .library(name: "XMPPCore", targets: ["XMPPCore"]),
        .library(name: "XMPPStream", targets: ["XMPPStream"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
    ],
    targets: [
        .systemLibrary(name: "CExpat", pkgConfig: "expat", providers: [.apt(["libexpat1-dev"])]),
        .target(
            name: "XMPPCore",
            swiftSettings: strictSettings
        ),
        .target(
            name: "XMPPStream",
            dependencies: [
                "XMPPCore",
                "CExpat",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "braid",
            dependencies: [
                "XMPPCore",
                "XMPPStream",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .executableTarget(
            name: "BraidBench",
            dependencies: [
                "XMPPCore",
                "XMPPStream",
                "CExpat",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "XMPPCoreTests",
            dependencies: ["XMPPCore"],
            swiftSettings: strictSettings
        ),
        .testTarget(
            name: "XMPPStreamTests",
            dependencies: [
                "XMPPStream",
                "XMPPCore",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ],
            swiftSettings: strictSettings
        ),
    ],
    swiftLanguageModes: [.v6]
)
