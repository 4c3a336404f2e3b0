/// The provisioning API as a module: its routes on the HTTPS listener, nothing on the XMPP
/// side. Its store (tokens, audit log) is the storage protocol's, as every backend keeps it.
/// The operator dashboard (`/dashboard`) comes with it: it is a page over the same API and
/// the same tokens, so it is there exactly when the API is.
struct ProvisioningModule: BraidModule {
    let settings: BraidConfiguration.ProvisioningSettings

    var name: String { "provisioning" }

    func register(in builder: inout ModuleBuilder) {
        guard settings.enabled else { return }
        let settings = self.settings
        builder.onHTTP { router, server in
            do {
                try ProvisioningAPI(server: server, settings: settings).install(on: router)
            } catch {
                // Only a prefix the generated code cannot parse; the dashboard still loads.
                server.logger.error("provisioning API: its routes could not be registered", metadata: ["error": "\(error)"])
            }
            Dashboard.install(on: router)
        }
    }
}
